"""GRU encoder-decoder with Luong (multiplicative) attention: dot or general scores.

The decoder first updates its state, then attends with it (Luong et al., 2015, "global attention"):

    s_t = GRU(embed(y_{t-1}), s_{t-1})
    score(s_t, h_j) = s_t . h_j  (dot)   or   s_t^T W_a h_j  (general)
    a_t = softmax over valid j,   c_t = sum_j a_tj h_j,   s~_t = tanh(W_c [c_t; s_t]),   p(y_t) = softmax(W_o s~_t)

Because the query does not depend on the context, training runs the decoder GRU over the whole target at
once and attends for all steps in one ``attnkit.functional.attention`` call.

Paper: https://arxiv.org/abs/1508.04025
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit import functional as F_attn
from attnkit import masks
from attnkit.tasks.translate.models.base import Seq2Seq
from attnkit.tasks.translate.models.gru import GRUEncoder

LUONG_SCORES = ("dot", "general")


class LuongSeq2Seq(Seq2Seq):
    """The Luong-attention translator (see the module docstring).

    Args:
        score: ``"dot"`` or ``"general"`` (a learned ``W_a`` between decoder and encoder states).
        The rest as in ``BahdanauSeq2Seq``.

    Shape:
        - src ``(B, S)``, src_lens ``(B,)``, tgt_in ``(B, T)``
        - logits ``(B, T, tgt_vocab)``; attn["weights"] ``(B, T, S)``
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, embed_dim: int, hidden: int, num_layers: int,
                 dropout: float, score: str = "general", bidirectional: bool = False):
        super().__init__()
        if score not in LUONG_SCORES:
            raise ValueError(f"score must be one of {LUONG_SCORES}, got {score!r}")
        self.score_name = score
        self.encoder = GRUEncoder(src_vocab, embed_dim, hidden, num_layers, dropout, bidirectional)
        self.embedding = nn.Embedding(tgt_vocab, embed_dim, padding_idx=0)
        self.rnn = nn.GRU(embed_dim, hidden, num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.w_a = nn.Parameter(torch.empty(hidden, hidden)) if score == "general" else None
        if self.w_a is not None:
            nn.init.xavier_uniform_(self.w_a)
        self.combine = nn.Linear(2 * hidden, hidden, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, tgt_vocab)

    def _attend(self, queries, enc_out, src_lens):
        """Context and weights for decoder states ``queries (B, T, H)`` over ``enc_out (B, S, H)``."""
        return F_attn.attention(queries, enc_out, enc_out, score=self._score(), mask=masks.padding(src_lens),
                                return_weights=True)  # (B, T, H), (B, T, S)

    def _score(self):
        from attnkit.functional import scores

        if self.w_a is None:
            return scores.dot  # s_t . h_j
        w_a = self.w_a
        return lambda q, k: scores.general(q, k, w_a)  # s_t^T W_a h_j

    def _output(self, dec_out, context):
        # s~_t = tanh(W_c [c_t; s_t])
        attn_h = torch.tanh(self.combine(torch.cat([context, dec_out], dim=-1)))  # (B, T, H)
        return self.out(self.dropout(attn_h))  # (B, T, V)

    def encode(self, src, src_lens):
        enc_out, hidden = self.encoder(src, src_lens)  # (B, S, H), (layers, B, H)
        return enc_out, src_lens, hidden.transpose(0, 1).contiguous()

    def step(self, y_prev, state):
        enc_out, src_lens, hidden = state
        x = self.dropout(self.embedding(y_prev)).unsqueeze(1)  # (B, 1, E)
        dec_out, hidden = self.rnn(x, hidden.transpose(0, 1).contiguous())  # (B, 1, H), (layers, B, H)
        context, weights = self._attend(dec_out, enc_out, src_lens)  # (B, 1, H), (B, 1, S)
        logits = self._output(dec_out, context).squeeze(1)  # (B, V)
        return logits, (enc_out, src_lens, hidden.transpose(0, 1).contiguous()), weights.squeeze(1)

    def forward(self, src, src_lens, tgt_in, *, need_weights: bool = True):
        del need_weights  # the weights come with the context vectors
        enc_out, hidden = self.encoder(src, src_lens)  # (B, S, H), (layers, B, H)
        dec_out, _ = self.rnn(self.dropout(self.embedding(tgt_in)), hidden)  # (B, T, H)
        context, weights = self._attend(dec_out, enc_out, src_lens)  # (B, T, H), (B, T, S)
        return self._output(dec_out, context), {"weights": weights}
