"""The two scoring modules of d2l's "attention scoring functions": additive and scaled dot-product attention.

Both take d2l's ``valid_lens`` (valid keys per batch ``(B,)`` or per query ``(B, L)``), turn it into
:func:`attnkit.masks.padding` and call :func:`attnkit.functional.attention.attention` with their score.

One deliberate difference from d2l: a query with ``valid_len == 0`` gets zero weights and a zero output
(attnkit's rule for fully masked rows), where d2l's ``-1e6`` fill spreads the weights uniformly.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from attnkit import masks
from attnkit._checks import check_probability
from attnkit.functional.attention import attention
from attnkit.functional.scores import additive, scaled_dot

__all__ = ["AdditiveAttention", "DotProductAttention"]


def _check_dropout(dropout) -> float:
    return check_probability("dropout", dropout)


def _check_qkv(queries, keys, values) -> None:
    for name, t in (("queries", queries), ("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape (B, *, D), got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must have shape (B, L, D) (or (B, H, L, D)), got {tuple(t.shape)}. "
                             "Add a length dim with unsqueeze(1) for a single query.")
    if keys.shape[:-1] != values.shape[:-1]:
        raise ValueError(f"keys and values must agree on all but the last dim, got keys {tuple(keys.shape)} "
                         f"and values {tuple(values.shape)}")


def _padding_mask(valid_lens, queries: torch.Tensor, keys: torch.Tensor):
    """``valid_lens`` ``(B,)`` or ``(B, L)`` -> ``masks.padding``; ``None`` -> no mask."""
    if valid_lens is None:
        return None
    if not isinstance(valid_lens, torch.Tensor):
        raise TypeError(f"valid_lens must be an integer tensor (B,) or (B, L), got {type(valid_lens).__name__}")
    if valid_lens.is_floating_point() or valid_lens.is_complex() or valid_lens.dtype == torch.bool:
        raise TypeError(f"valid_lens must be an integer tensor (B,) or (B, L), got dtype {valid_lens.dtype}")
    B, L = queries.shape[0], queries.shape[-2]
    if tuple(valid_lens.shape) not in ((B,), (B, L)):
        raise ValueError(f"valid_lens must have shape (B,) = ({B},) or (B, L) = ({B}, {L}), "
                         f"got {tuple(valid_lens.shape)}")
    if valid_lens.numel() and (valid_lens.min() < 0 or valid_lens.max() > keys.shape[-2]):
        raise ValueError(f"valid_lens must lie in [0, S] = [0, {keys.shape[-2]}], got values in "
                         f"[{int(valid_lens.min())}, {int(valid_lens.max())}]")
    return masks.padding(valid_lens)


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention: ``score(q, k) = w_v^T tanh(W_q q + W_k k)``, then masked softmax.

    Queries and keys may have different sizes; this is a one-hidden-layer MLP on ``[q; k]`` with ``tanh``.

    ====================  =========================
    symbol                argument / parameter
    ====================  =========================
    ``W_q`` (h, Dq)       ``W_q.weight``
    ``W_k`` (h, Dk)       ``W_k.weight``
    ``w_v`` (h,)          ``w_v.weight[0]``
    ``h``                 ``num_hiddens``
    ====================  =========================

    Args:
        key_size: ``Dk``.
        query_size: ``Dq``.
        num_hiddens: hidden size ``h``.
        dropout: dropout on the attention weights (training only).

    Shape:
        queries ``(B, L, Dq)``, keys ``(B, S, Dk)``, values ``(B, S, Dv)``, valid_lens ``(B,)`` or ``(B, L)``
        -> out ``(B, L, Dv)``, weights ``(B, L, S)``.

    Raises:
        TypeError / ValueError: bad sizes, dropout, or inputs (named in the message).

    Paper: https://arxiv.org/abs/1409.0473
    """

    def __init__(self, key_size: int, query_size: int, num_hiddens: int, dropout: float = 0.0, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("key_size", key_size), ("query_size", query_size), ("num_hiddens", num_hiddens)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be a positive int, got {type(v).__name__} {v!r}")
            if v < 1:
                raise ValueError(f"{name} must be a positive int, got {v}")
        factory = {"device": device, "dtype": dtype}
        self.W_k = nn.Linear(key_size, num_hiddens, bias=False, **factory)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=False, **factory)
        self.w_v = nn.Linear(num_hiddens, 1, bias=False, **factory)
        self.dropout = _check_dropout(dropout)

    def score(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``w_v^T tanh(W_q q + W_k k)`` for every query/key pair: ``(..., L, Dq), (..., S, Dk) -> (..., L, S)``."""
        return additive(q, k, self.W_q.weight, self.W_k.weight, self.w_v.weight[0])

    def forward(self, queries, keys, values, valid_lens=None, *, return_weights: bool = False):
        """Attend from ``queries`` to ``keys``/``values``; returns ``out`` or ``(out, weights)``."""
        _check_qkv(queries, keys, values)
        if queries.shape[-1] != self.W_q.in_features:
            raise ValueError(f"queries must have last dim query_size = {self.W_q.in_features}, "
                             f"got {tuple(queries.shape)}")
        if keys.shape[-1] != self.W_k.in_features:
            raise ValueError(f"keys must have last dim key_size = {self.W_k.in_features}, got {tuple(keys.shape)}")
        mask = _padding_mask(valid_lens, queries, keys)
        # bound by keyword, the kernels recognize the additive score and project queries/keys once (not per tile)
        score = functools.partial(additive, w_q=self.W_q.weight, w_k=self.W_k.weight, w_v=self.w_v.weight[0])
        return attention(queries, keys, values, score=score, mask=mask,
                         dropout_p=self.dropout if self.training else 0.0, return_weights=return_weights)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


class DotProductAttention(nn.Module):
    """Scaled dot-product attention: ``softmax(Q K^T / sqrt(d)) V`` with d2l's ``valid_lens``.

    Args:
        dropout: dropout on the attention weights (training only).

    Shape:
        queries ``(B, L, D)`` (or ``(B, H, L, D)``), keys ``(B, S, D)``, values ``(B, S, Dv)``, valid_lens
        ``(B,)`` or ``(B, L)`` -> out ``(B, L, Dv)``, weights ``(B, L, S)``.

    Raises:
        TypeError / ValueError: bad dropout or inputs (named in the message).

    Paper: https://arxiv.org/abs/1706.03762 (section 3.2.1)
    """

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = _check_dropout(dropout)

    def forward(self, queries, keys, values, valid_lens=None, *, return_weights: bool = False):
        """Attend from ``queries`` to ``keys``/``values``; returns ``out`` or ``(out, weights)``."""
        _check_qkv(queries, keys, values)
        if queries.shape[-1] != keys.shape[-1]:
            raise ValueError(f"queries and keys must share the last dim d, got queries {tuple(queries.shape)} "
                             f"and keys {tuple(keys.shape)}. Use AdditiveAttention for different sizes.")
        mask = _padding_mask(valid_lens, queries, keys)
        # S = Q K^T / sqrt(d)
        return attention(queries, keys, values, score=scaled_dot, mask=mask,
                         dropout_p=self.dropout if self.training else 0.0, return_weights=return_weights)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"
