"""Encoder-decoder translators. Every model has the same small interface (see ``base.Seq2Seq``):

- ``forward(src, src_lens, tgt_in) -> (logits (B, T, V), attn)`` for teacher-forced training, where
  ``attn["weights"]`` is ``(B, T, S)`` (what an output word looked at) and, for the Transformer,
  ``attn["layers"]`` holds the per-layer cross-attention ``(B, H, T, S)``;
- ``encode(src, src_lens) -> state`` and ``step(y_prev, state) -> (logits (B, V), state, weights (B, S))``
  for decoding one word at a time; ``state`` is a tuple of batch-first tensors, so beam search can
  reorder it with ``index_select(0, ...)``.
"""

from __future__ import annotations

from attnkit.tasks.translate.models.base import MODEL_KINDS, Seq2Seq, build_model

__all__ = ["MODEL_KINDS", "Seq2Seq", "build_model"]
