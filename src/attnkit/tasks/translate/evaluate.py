"""Held-out evaluation and the run's report: metrics.json, samples.txt and attention heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnkit._io import write_text_atomic
from attnkit.tasks.translate import metrics
from attnkit.tasks.translate.data import Pair
from attnkit.tasks.translate.decode import beam_search, greedy
from attnkit.tasks.translate.tokenize import detokenize
from attnkit.tasks.translate.train import collate
from attnkit.tasks.translate.vocab import Vocab


@torch.no_grad()
def translate_tokens(model, sentences: list[list[str]], src_vocab: Vocab, tgt_vocab: Vocab, *,
                     beam: int = 1, max_len: int = 40, batch_size: int = 128
                     ) -> list[tuple[list[str], torch.Tensor]]:
    """Translate tokenized sentences; return per sentence (output words, attention ``(T, S)``).

    The attention has one row per output word plus one for ``<eos>`` when it was produced.
    """
    model.eval()
    bos, eos = tgt_vocab.bos_id, tgt_vocab.eos_id
    results: list[tuple[list[str], torch.Tensor]] = []
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i: i + batch_size]
        src, src_lens, _, _ = collate([(src_vocab.encode(s), [0]) for s in chunk], bos, eos)
        if beam <= 1:
            ids, weights = greedy(model, src, src_lens, bos=bos, eos=eos, max_len=max_len)
            results.extend((tgt_vocab.decode(x), w) for x, w in zip(ids, weights, strict=True))
        else:
            for b in range(len(chunk)):
                L = int(src_lens[b])
                x, w, _ = beam_search(model, src[b: b + 1, :L], src_lens[b: b + 1], bos=bos, eos=eos,
                                      max_len=max_len, beam_size=beam)
                results.append((tgt_vocab.decode(x), w))
    return results


@torch.no_grad()
def teacher_forced_weights(model, pairs: list[Pair], src_vocab: Vocab, tgt_vocab: Vocab,
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


def evaluate(model, pairs: list[Pair], src_vocab: Vocab, tgt_vocab: Vocab, *, beam: int = 1,
             max_len: int = 40) -> tuple[dict, list[dict]]:
    """Score ``model`` on held-out ``pairs``: corpus BLEU, exact match and (with gold) alignment accuracy.

    Pairs sharing a source sentence are scored once, against all their references.
    Returns ``(metrics, samples)``; each sample has ``src``, ``refs``, ``hyp`` (token lists) and ``weights``.
    """
    if not pairs:
        raise ValueError("pairs must hold at least one held-out pair, got none")
    refs: dict[tuple[str, ...], list[list[str]]] = {}
    for p in pairs:
        refs.setdefault(tuple(p.src), []).append(p.tgt)
    sources = [list(s) for s in refs]
    outputs = translate_tokens(model, sources, src_vocab, tgt_vocab, beam=beam, max_len=max_len)
    hyps = [h for h, _ in outputs]
    ref_lists = [refs[tuple(s)] for s in sources]
    result = {
        "sentences": len(sources),
        "pairs": len(pairs),
        "bleu": metrics.corpus_bleu(hyps, ref_lists),
        "exact_match": metrics.exact_match(hyps, ref_lists),
        "decoding": "greedy" if beam <= 1 else f"beam {beam}",
    }
    gold = [p for p in pairs if p.align is not None]
    if gold:
        weights = teacher_forced_weights(model, gold, src_vocab, tgt_vocab)
        result["alignment_accuracy"] = metrics.alignment_accuracy(weights, [p.align for p in gold])
    samples = [{"src": s, "refs": r, "hyp": h, "weights": w}
               for s, r, (h, w) in zip(sources, ref_lists, outputs, strict=True)]
    return result, samples


def write_report(run_dir: str | Path, model, result: dict, samples: list[dict], src_vocab: Vocab,
                 tgt_vocab: Vocab, *, n_heatmaps: int = 4, n_samples: int = 50) -> list[Path]:
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
        src_tokens = s["src"]
        out_tokens = s["hyp"] + (["<eos>"] if s["weights"].shape[0] > len(s["hyp"]) else [])
        base = run_dir / "heatmaps" / f"sample{i}"
        title = f"{detokenize(s['src'])}\n-> {detokenize(s['hyp'])}"
        paths.append(save_heatmap(s["weights"], src_tokens, out_tokens, f"{base}.png", title=title))
        if not out_tokens or not hasattr(model, "dec_layers"):
            continue
        # Transformer: every head of every decoder layer, teacher-forced on its own output
        src, src_lens, tgt_in, _ = collate([(src_vocab.encode(src_tokens), tgt_vocab.encode(s["hyp"]))],
                                           tgt_vocab.bos_id, tgt_vocab.eos_id)
        with torch.no_grad():
            _, attn = model(src, src_lens, tgt_in)
        out_eos = s["hyp"] + ["<eos>"]
        for layer, w in enumerate(attn["layers"]):
            paths.append(save_heatmap(w[0], src_tokens, out_eos, f"{base}_layer{layer}.png",
                                      title=f"decoder layer {layer} cross-attention\n{title}"))
    write_attention_html(run_dir / FILE, model, samples[:n_heatmaps], src_vocab, tgt_vocab,
                         title=f"attnkit translate: {len(samples[:n_heatmaps])} held-out sentences")
    return paths
