"""The GRU encoder shared by the additive (Bahdanau) and Luong translators."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class GRUEncoder(nn.Module):
    """Embed source tokens and run a (multi-layer, optionally bidirectional) GRU over them, ignoring padding.

    With ``bidirectional`` (as in Bahdanau et al.) the two directions' states are summed, so the annotation
    h_j of word j sums up the sentence read from both ends up to j, and the sizes stay ``hidden``.

    Shape:
        - src: ``(B, S)`` token ids, padded at the end; src_lens: ``(B,)``
        - returns outputs ``(B, S, hidden)`` (zeros at padding) and the final hidden ``(num_layers, B, hidden)``
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, num_layers: int, dropout: float,
                 bidirectional: bool = False):
        super().__init__()
        self.bidirectional = bool(bidirectional)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.rnn = nn.GRU(embed_dim, hidden, num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0, bidirectional=self.bidirectional)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.embedding(src))  # (B, S, E)
        packed = pack_padded_sequence(x, src_lens.cpu(), batch_first=True, enforce_sorted=False)
        out, hidden = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, dirs * H)
        if self.bidirectional:
            H = hidden.shape[-1]
            out = out[..., :H] + out[..., H:]  # (B, S, H): forward + backward
            hidden = hidden.view(-1, 2, *hidden.shape[1:]).sum(1)  # (num_layers, B, H)
        return out, hidden  # (B, S, H), (num_layers, B, H)
