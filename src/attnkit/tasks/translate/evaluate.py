"""Held-out evaluation and the run's report: metrics.json, samples.txt and attention heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnkit._io import write_text_atomic
from attnkit.tasks.translate import metrics, vocabulary
from attnkit.tasks.translate.data import Pair
from attnkit.tasks.translate.decode import beam_search_batch, greedy
from attnkit.tasks.translate.tokenize import detokenize, detokenize_text
from attnkit.tasks.translate.train import collate
from attnkit.tasks.translate.vocab import UNK


@torch.no_grad()
def translate_tokens(model, sentences: list[list[str]], src_vocab, tgt_vocab, *, beam: int = 4,
                     length_penalty: float = 1.0, max_len: int = 40, batch_size: int = 128
                     ) -> list[tuple[list[str], torch.Tensor, list[str]]]:
    """Translate tokenized sentences; return per sentence (output words, attention ``(T, S)``, labels).

    ``beam`` 1 is greedy decoding; otherwise batched beam search ranked by ``log p / len ** length_penalty``.
    The attention has one row per output id plus one for ``<eos>`` when it was produced, and one column per
    source id; ``labels`` names the output ids (words, or subword pieces), ``vocabulary.labels`` the source's.
    """
    model.eval()
    bos, eos = tgt_vocab.bos_id, tgt_vocab.eos_id
    results: list[tuple[list[str], torch.Tensor, list[str]]] = []
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i: i + batch_size]
        src, src_lens, _, _ = collate([(src_vocab.encode(s), [0]) for s in chunk], bos, eos)
        if beam <= 1:
            found = greedy(model, src, src_lens, bos=bos, eos=eos, max_len=max_len)
            found = list(zip(*found, strict=True))
        else:
            found = [(x, w) for x, w, _ in beam_search_batch(model, src, src_lens, bos=bos, eos=eos, max_len=max_len,
                                                              beam_size=beam, length_penalty=length_penalty)]
        results.extend((tgt_vocab.decode(x), w, vocabulary.labels_of(tgt_vocab, x)) for x, w in found)
    return results


@torch.no_grad()
def teacher_forced_weights(model, pairs: list[Pair], src_vocab, tgt_vocab,
                           batch_size: int = 128) -> list[torch.Tensor]:
    """Attention ``(len(tgt), len(src))`` of each pair when the decoder is fed the reference."""
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        items = [(src_vocab.encode(p.src), tgt_vocab.encode(p.tgt)) for p in chunk]
        src, src_lens, tgt_in, _ = collate(items, tgt_vocab.bos_id, tgt_vocab.eos_id)
        _, attn = model(src, src_lens, tgt_in)
        w = attn["weights"]  # (B, T, S)
        out.extend(w[b, : len(p.tgt), : len(p.src)] for b, p in enumerate(chunk))
    return out


def evaluate(model, pairs: list[Pair], src_vocab, tgt_vocab, *, beam: int = 4, length_penalty: float = 1.0,
             max_len: int = 40) -> tuple[dict, list[dict]]:
    """Score ``model`` on held-out ``pairs``: corpus BLEU, exact match and (with gold) alignment accuracy.

    ``bleu`` is the historic score of this job: sacrebleu over the lowercased word tokens (``tokenize="none"``).
    ``bleu_13a`` and ``chrf`` are sacreBLEU's standard scores of the detokenized output against the references
    as written in the data file (lowercase-insensitive: the models here are trained on lowercased text), each
    with its sacreBLEU signature. Pairs sharing a source sentence are scored once, against all their references.
    Returns ``(metrics, samples)``; each sample has ``src``, ``refs``, ``hyp`` (token lists), ``weights`` and
    ``src_labels``/``hyp_labels`` (what the weights' columns and rows stand for).
    """
    if not pairs:
        raise ValueError("pairs must hold at least one held-out pair, got none")
    refs: dict[tuple[str, ...], list[list[str]]] = {}
    texts: dict[tuple[str, ...], list[str]] = {}
    for p in pairs:
        refs.setdefault(tuple(p.src), []).append(p.tgt)
        texts.setdefault(tuple(p.src), []).append(p.extra.get("tgt_text") or detokenize_text(p.tgt))
    sources = [list(s) for s in refs]
    outputs = translate_tokens(model, sources, src_vocab, tgt_vocab, beam=beam, length_penalty=length_penalty,
                               max_len=max_len)
    hyps = [h for h, _, _ in outputs]
    ref_lists = [refs[tuple(s)] for s in sources]
    standard = metrics.standard_scores([detokenize_text(h) for h in hyps], [texts[tuple(s)] for s in sources])
    result = {
        "sentences": len(sources),
        "pairs": len(pairs),
        "bleu": metrics.corpus_bleu(hyps, ref_lists),
        **standard,
        "exact_match": metrics.exact_match(hyps, ref_lists),
        "unk_outputs": sum(UNK in h for h in hyps),
        "decoding": "greedy" if beam <= 1 else f"beam {beam}, length penalty {length_penalty:g}",
    }
    gold = [p for p in pairs if p.align is not None]
    if gold:
        weights = teacher_forced_weights(model, gold, src_vocab, tgt_vocab)
        result["alignment_accuracy"] = metrics.alignment_accuracy(weights, [p.align for p in gold])
    samples = [{"src": s, "refs": r, "hyp": h, "weights": w, "src_labels": vocabulary.labels(src_vocab, s),
                "hyp_labels": labels}
               for s, r, (h, w, labels) in zip(sources, ref_lists, outputs, strict=True)]
    return result, samples


def write_report(run_dir: str | Path, model, result: dict, samples: list[dict], src_vocab,
                 tgt_vocab, *, n_heatmaps: int = 4, n_samples: int = 50) -> list[Path]:
    """Write ``metrics.json``, ``samples.txt``, heatmaps under ``run_dir/heatmaps`` and the explorer of the same
    sentences, ``run_dir/attention.html``; return the PNG paths."""
    from attnkit.tasks.translate.explorer import FILE, write_attention_html
    from attnkit.viz.heatmap import save_heatmap

    run_dir = Path(run_dir)
    write_text_atomic(run_dir / "metrics.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    lines = []
    for s in samples[:n_samples]:
        ok = "ok " if any(s["hyp"] == r for r in s["refs"]) else "BAD"
        lines.append(f"{ok} src: {detokenize(s['src'])}\n    ref: "
                     + " | ".join(detokenize(r) for r in s["refs"]) + f"\n    out: {detokenize(s['hyp'])}\n")
    write_text_atomic(run_dir / "samples.txt", "\n".join(lines))
    paths = []
    for i, s in enumerate(samples[:n_heatmaps]):
        src_labels = s.get("src_labels") or vocabulary.labels(src_vocab, s["src"])
        hyp_labels = s.get("hyp_labels") or vocabulary.labels(tgt_vocab, s["hyp"])
        out_labels = hyp_labels + (["<eos>"] if s["weights"].shape[0] > len(hyp_labels) else [])
        base = run_dir / "heatmaps" / f"sample{i}"
        title = f"{detokenize(s['src'])}\n-> {detokenize(s['hyp'])}"
        paths.append(save_heatmap(s["weights"], src_labels, out_labels, f"{base}.png", title=title))
        if not out_labels or not hasattr(model, "dec_layers"):
            continue
        # Transformer: every head of every decoder layer, teacher-forced on its own output (re-encoded)
        src, src_lens, tgt_in, _ = collate([(src_vocab.encode(s["src"]), tgt_vocab.encode(s["hyp"]))],
                                           tgt_vocab.bos_id, tgt_vocab.eos_id)
        with torch.no_grad():
            _, attn = model(src, src_lens, tgt_in)
        out_eos = vocabulary.labels(tgt_vocab, s["hyp"]) + ["<eos>"]
        for layer, w in enumerate(attn["layers"]):
            paths.append(save_heatmap(w[0], src_labels, out_eos, f"{base}_layer{layer}.png",
                                      title=f"decoder layer {layer} cross-attention\n{title}"))
    write_attention_html(run_dir / FILE, model, samples[:n_heatmaps], src_vocab, tgt_vocab,
                         title=f"attnkit translate: {len(samples[:n_heatmaps])} held-out sentences")
    return paths
