"""GRU encoder + GRU decoder with additive (Bahdanau) attention, as in d2l's "Bahdanau attention" section.

At output step t the decoder's top hidden state s_{t-1} is the query; the encoder outputs h_j are keys and
values:

    e_tj = w_v^T tanh(W_q s_{t-1} + W_k h_j),   a_tj = softmax_j(e_tj) over valid j,   c_t = sum_j a_tj h_j
    s_t = GRU([embed(y_{t-1}); c_t], s_{t-1}),   p(y_t) = softmax(W_o s_t)

Paper: https://arxiv.org/abs/1409.0473
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.nn.scoring import AdditiveAttention
from attnkit.tasks.translate.models.base import Seq2Seq
from attnkit.tasks.translate.models.gru import GRUEncoder


class BahdanauSeq2Seq(Seq2Seq):
    """The additive-attention translator (see the module docstring for the equations).

    Args:
        src_vocab, tgt_vocab: vocabulary sizes; embed_dim: word vectors; hidden: GRU and attention size;
        num_layers: GRU layers (encoder and decoder); dropout: on embeddings, between GRU layers, in attention.

    Shape:
        - src ``(B, S)``, src_lens ``(B,)``, tgt_in ``(B, T)`` (``<bos>`` + target without its last token)
        - logits ``(B, T, tgt_vocab)``; attn["weights"] ``(B, T, S)``
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, embed_dim: int, hidden: int, num_layers: int,
                 dropout: float, bidirectional: bool = False):
        super().__init__()
        self.encoder = GRUEncoder(src_vocab, embed_dim, hidden, num_layers, dropout, bidirectional)
        self.embedding = nn.Embedding(tgt_vocab, embed_dim, padding_idx=0)
        self.attention = AdditiveAttention(hidden, hidden, hidden, dropout)
        self.rnn = nn.GRU(embed_dim + hidden, hidden, num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, tgt_vocab)

    def encode(self, src, src_lens):
        enc_out, hidden = self.encoder(src, src_lens)  # (B, S, H), (layers, B, H)
        return enc_out, src_lens, hidden.transpose(0, 1).contiguous()  # state: (B, S, H), (B,), (B, layers, H)

    def step(self, y_prev, state):
        enc_out, src_lens, hidden = state
        hidden = hidden.transpose(0, 1).contiguous()  # (layers, B, H)
        query = hidden[-1].unsqueeze(1)  # (B, 1, H): s_{t-1}, the top layer
        # c_t = sum_j a_tj h_j with a_tj = softmax_j(w_v^T tanh(W_q s_{t-1} + W_k h_j))
        context, weights = self.attention(query, enc_out, enc_out, src_lens, return_weights=True)
        x = torch.cat([self.dropout(self.embedding(y_prev)).unsqueeze(1), context], dim=-1)  # (B, 1, E + H)
        out, hidden = self.rnn(x, hidden)  # (B, 1, H), (layers, B, H)
        logits = self.out(out.squeeze(1))  # (B, V)
        return logits, (enc_out, src_lens, hidden.transpose(0, 1).contiguous()), weights.squeeze(1)

    def forward(self, src, src_lens, tgt_in, *, need_weights: bool = True):
        del need_weights  # the weights come with the context vectors
        state = self.encode(src, src_lens)
        logits, weights = [], []
        for t in range(tgt_in.shape[1]):
            step_logits, state, w = self.step(tgt_in[:, t], state)
            logits.append(step_logits)
            weights.append(w)
        return torch.stack(logits, 1), {"weights": torch.stack(weights, 1)}  # (B, T, V), (B, T, S)
