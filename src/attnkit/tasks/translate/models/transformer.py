"""Transformer encoder-decoder built from attnkit's layers (pre-norm), sinusoidal positions, padding and
causal masks.

    x = embed(tokens) * sqrt(d) + PE;  encoder: N x [self-attention (source padding mask), feed-forward]
    decoder: N x [causal self-attention, cross-attention on the encoder output (source padding), feed-forward]
    p(y_t) = softmax(W_o LayerNorm(x_t))

Paper: https://arxiv.org/abs/1706.03762
"""

from __future__ import annotations

import math

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
          attn["self_layers"]: per layer the decoder self-attention ``(B, H, T, T)``,
          attn["enc_layers"]: per layer the encoder self-attention ``(B, H, S, S)``
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

    def _encode(self, src, src_lens, weights: list | None = None):
        mask = masks.padding(src_lens)  # key j of sentence b is real iff j < src_lens[b]
        x = self.pos(self.src_embed(src) * math.sqrt(self.d))  # (B, S, d)
        for layer in self.enc_layers:
            if weights is None:
                x = layer(x, mask=mask)
            else:  # the picture asks for each layer's self-attention
                x, w = layer(x, mask=mask, need_weights=True)
                weights.append(w)  # (B, H, S, S)
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
        enc = [] if need_weights else None
        memory, mask = self._encode(src, src_lens, enc)
        logits, cross, selfw = self._decode(tgt_in, memory, mask, need_weights=need_weights)
        attn = {"layers": cross, "self_layers": selfw, "enc_layers": enc or []}
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
        # (B,) source lengths, then per decoder layer: its cross-attention keys and values of the memory,
        # projected once here, and its self-attention keys and values of the positions decoded so far (none yet),
        # each (B, G, S|t, D)
        state = [src_lens]
        for layer in self.dec_layers:
            mk, mv = layer.project_memory(memory)
            empty = mk.new_zeros(mk.shape[0], mk.shape[1], 0, mk.shape[3])
            state += [mk, mv, empty, empty]
        return tuple(state)

    def step(self, y_prev, state):
        """One output word. Each layer projects only the new position's keys and values and attends over them
        and its cached ones (``TransformerDecoderLayer.step``); the memory's keys and values were projected once by
        :meth:`encode`. A step costs O(t) attention and no re-projection; the logits equal those of
        :meth:`forward` on the prefix."""
        src_lens, *cache = state
        t = cache[2].shape[2] if cache else 0
        mask = masks.padding(src_lens)
        x = self.pos(self.tgt_embed(y_prev[:, None]) * math.sqrt(self.d), offset=t)  # (B, 1, d)
        new_state, cross, last = [src_lens], None, len(self.dec_layers) - 1
        for i, layer in enumerate(self.dec_layers):
            mk, mv, sk, sv = cache[4 * i : 4 * i + 4]
            if i == last:  # the last layer's cross-attention is the picture
                x, (sk, sv), _, cross = layer.step(x, (mk, mv), (sk, sv), memory_mask=mask, need_weights=True)
            else:
                x, (sk, sv) = layer.step(x, (mk, mv), (sk, sv), memory_mask=mask)
            new_state += [mk, mv, sk, sv]
        logits = self.out(self.dec_norm(x[:, 0]))  # (B, V)
        return logits, tuple(new_state), cross[:, :, 0].mean(1)  # (B, V), state, (B, S)
