"""Transformer encoder-decoder built from attnkit's layers (pre-norm), sinusoidal positions, padding and
causal masks.

    x = embed(tokens) * sqrt(d) + PE;  encoder: N x [self-attention (source padding mask), feed-forward]
    decoder: N x [causal self-attention, cross-attention on the encoder output (source padding), feed-forward]
    p(y_t) = softmax(W_o LayerNorm(x_t))

Paper: https://arxiv.org/abs/1706.03762
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit import masks
from attnkit.nn.positional import SinusoidalPositionalEncoding
from attnkit.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer
from attnkit.tasks.translate.models.base import Seq2Seq, token_loss


class TransformerSeq2Seq(Seq2Seq):
    """A pre-norm Transformer translator.

    Args:
        hidden: model width ``d``; num_heads: heads per attention; ff_dim: feed-forward width;
        num_layers: encoder and decoder layers each; max_len: longest sequence the positions cover.

    Shape:
        - src ``(B, S)``, src_lens ``(B,)``, tgt_in ``(B, T)``
        - logits ``(B, T, tgt_vocab)``; attn["weights"] ``(B, T, S)`` (last layer, mean over heads),
          attn["layers"]: per decoder layer the cross-attention ``(B, H, T, S)``,
          attn["self_layers"]: per layer the decoder self-attention ``(B, H, T, T)``
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, embed_dim: int, hidden: int, num_layers: int,
                 dropout: float, num_heads: int, ff_dim: int, max_len: int):
        super().__init__()
        del embed_dim  # the Transformer's embeddings have the model width
        self.d = hidden
        self.src_embed = nn.Embedding(src_vocab, hidden, padding_idx=0)
        self.tgt_embed = nn.Embedding(tgt_vocab, hidden, padding_idx=0)
        self.pos = SinusoidalPositionalEncoding(hidden, max_len, dropout)
        self.enc_layers = nn.ModuleList(TransformerEncoderLayer(hidden, num_heads, ff_dim, dropout, norm_first=True)
                                        for _ in range(num_layers))
        self.dec_layers = nn.ModuleList(TransformerDecoderLayer(hidden, num_heads, ff_dim, dropout, norm_first=True)
                                        for _ in range(num_layers))
        self.enc_norm = nn.LayerNorm(hidden)
        self.dec_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, tgt_vocab)

    def _encode(self, src, src_lens):
        mask = masks.padding(src_lens)  # key j of sentence b is real iff j < src_lens[b]
        x = self.pos(self.src_embed(src) * math.sqrt(self.d))  # (B, S, d)
        for layer in self.enc_layers:
            x = layer(x, mask=mask)
        return self.enc_norm(x), mask  # (B, S, d)

    def _decode(self, tgt_in, memory, memory_mask, need_weights=False, keep=None):
        self_mask = masks.causal()  # output word t sees words <= t (padding sits after the real words)
        x = self.pos(self.tgt_embed(tgt_in) * math.sqrt(self.d))  # (B, T, d)
        cross, selfw = [], []
        for layer in self.dec_layers:
            if need_weights:
                x, sw, cw = layer(x, memory, self_mask=self_mask, memory_mask=memory_mask, need_weights=True)
                cross.append(cw)  # (B, H, T, S)
                selfw.append(sw)  # (B, H, T, T)
            else:
                x = layer(x, memory, self_mask=self_mask, memory_mask=memory_mask)
        if keep is not None:  # only the positions that are scored: the vocabulary projection dominates the cost
            x = x[keep]  # (N, d)
        return self.out(self.dec_norm(x)), cross, selfw  # (B, T, V) or (N, V)

    def forward(self, src, src_lens, tgt_in, *, need_weights: bool = True):
        memory, mask = self._encode(src, src_lens)
        logits, cross, selfw = self._decode(tgt_in, memory, mask, need_weights=need_weights)
        attn = {"layers": cross, "self_layers": selfw}
        if need_weights:
            attn["weights"] = cross[-1].mean(1)  # (B, T, S)
        return logits, attn

    def loss(self, src, src_lens, tgt_in, tgt_out, *, label_smoothing: float = 0.0):
        memory, mask = self._encode(src, src_lens)
        keep = tgt_out != 0  # (B, T) real target tokens
        logits, _, _ = self._decode(tgt_in, memory, mask, keep=keep)  # (N, V)
        return token_loss(logits, tgt_out[keep], label_smoothing)

    def encode(self, src, src_lens):
        memory, _ = self._encode(src, src_lens)
        empty = memory.new_zeros(src.shape[0], 0, self.d)
        # (B, S, d), (B,), then per decoder layer its inputs at the positions decoded so far (B, t, d)
        return (memory, src_lens, *[empty] * len(self.dec_layers))

    def step(self, y_prev, state):
        """One output word. Each layer attends from the new position to its own inputs at the earlier positions
        (kept in ``state``), so a step costs O(t) attention and O(1) feed-forward instead of re-running the
        whole prefix; the logits equal those of :meth:`forward` on the prefix."""
        memory, src_lens, *cache = state
        t = cache[0].shape[1] if cache else 0
        mask = masks.padding(src_lens)
        x = self.pos(self.tgt_embed(y_prev[:, None]) * math.sqrt(self.d), offset=t)  # (B, 1, d)
        new_cache, cross = [], None
        for i, (layer, past) in enumerate(zip(self.dec_layers, cache, strict=True)):
            new_cache.append(torch.cat([past, x], 1))  # (B, t + 1, d)
            if i == len(cache) - 1:  # the last layer's cross-attention is the picture
                x, _, cross = layer(x, memory, memory_mask=mask, prefix=past, need_weights=True)
            else:
                x = layer(x, memory, memory_mask=mask, prefix=past)
        logits = self.out(self.dec_norm(x[:, 0]))  # (B, V)
        return logits, (memory, src_lens, *new_cache), cross[:, :, 0].mean(1)  # (B, V), state, (B, S)
