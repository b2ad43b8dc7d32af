"""The translator's attention explorer: one HTML page (:mod:`attnkit.viz.explorer`) of a few translated sentences.

Each sentence shows the decoder's cross-attention while it produced its output (greedy or beam search: what
the heatmaps show). For the Transformer, the output is fed back teacher-forced to get every layer and head of
the encoder self-attention, the decoder self-attention and the cross-attention. The target side is labelled
with the output words plus ``<eos>``: decoder position t is the one that outputs word t.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnkit.tasks.translate import vocabulary
from attnkit.tasks.translate.tokenize import detokenize
from attnkit.tasks.translate.train import collate
from attnkit.tasks.translate.vocab import EOS

FILE = "attention.html"


def write_attention_html(path: str | Path, model, samples: list[dict], src_vocab, tgt_vocab, *,
                         title: str) -> Path:
    """Write the explorer of ``samples`` (dicts with ``src``, ``hyp`` token lists and ``weights (T, S)``) to
    ``path``; return it."""
    from attnkit.viz.explorer import Explorer

    page = Explorer(title=title)
    for s in samples:
        src = s.get("src_labels") or vocabulary.labels(src_vocab, s["src"])  # one label per source id
        hyp = s.get("hyp_labels") or vocabulary.labels(tgt_vocab, s["hyp"])
        out = hyp + ([EOS] if s["weights"].shape[0] > len(hyp) else [])
        name = f"{detokenize(s['src'])}  →  {detokenize(s['hyp'])}"
        if hasattr(model, "dec_layers") and s["hyp"]:
            kinds = _transformer_kinds(model, s["src"], s["hyp"], src_vocab, tgt_vocab)
            page.add(src, kinds, target_tokens=vocabulary.labels(tgt_vocab, s["hyp"]) + [EOS], name=name)
        else:
            page.add(src, {"cross (decoding)": s["weights"][: len(out)]}, target_tokens=out, name=name)
    return page.write(path)


@torch.no_grad()
def _transformer_kinds(model, src: list[str], hyp: list[str], src_vocab, tgt_vocab) -> dict:
    """Every layer and head of the three attentions, teacher-forced on the model's own output."""
    batch, lens, tgt_in, _ = collate([(src_vocab.encode(src), tgt_vocab.encode(hyp))], tgt_vocab.bos_id,
                                     tgt_vocab.eos_id)
    model.eval()
    _, attn = model(batch, lens, tgt_in)
    return {"cross": [w[0] for w in attn["layers"]],  # (H, T, S) per layer
            "encoder self": [w[0] for w in attn["enc_layers"]],  # (H, S, S)
            "decoder self": [w[0] for w in attn["self_layers"]]}  # (H, T, T)
