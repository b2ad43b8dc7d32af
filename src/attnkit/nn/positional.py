"""Positional encodings as modules: sinusoidal, learned, T5 relative bias, rotary and ALiBi.

Absolute encodings (:class:`SinusoidalPositionalEncoding`, :class:`LearnedPositionalEmbedding`) add to the
tokens ``(B, L, E)``. Relative ones either return an additive bias ``(1, H, L, S)`` for
``attention(..., bias=)`` (:class:`RelativePositionBias`, :class:`ALiBi`) or rotate queries and keys in the
``(B, H, L, D)`` layout (:class:`RotaryEmbedding`). The math lives in :mod:`attnkit.functional.positional`.

When ``L != S`` queries are the last ``L`` key positions (bottom-right, as :func:`attnkit.masks.causal`).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit._checks import check_probability
from attnkit.functional.positional import (
    _check_int,
    _check_positive_float,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    relative_position_bucket,
    relative_positions,
    sinusoidal_table,
)

__all__ = [
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEmbedding",
    "RelativePositionBias",
    "RotaryEmbedding",
    "ALiBi",
]


def _check_dropout(dropout) -> float:
    return check_probability("dropout", dropout)


def _check_tokens(x, embed_dim: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (B, L, E), got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(f"x must have shape (B, L, E) with E = embed_dim = {embed_dim}, got {tuple(x.shape)}")


class SinusoidalPositionalEncoding(nn.Module):
    """Add the fixed sinusoidal table of Vaswani et al. to the tokens, then dropout.

    ``out = dropout(x + PE[offset : offset + L])`` with ``PE`` from
    :func:`attnkit.functional.positional.sinusoidal_table`. The first ``max_len`` rows are cached; longer
    sequences compute the table on the fly (same values). The input is not scaled by ``sqrt(E)``.

    Args:
        embed_dim: ``E``.
        max_len: rows to cache.
        dropout: dropout after the addition (training only).
        base: wavelength base (10000).

    Shape:
        ``x`` ``(B, L, E)`` -> ``(B, L, E)``.

    Raises:
        TypeError / ValueError: bad sizes, dropout, ``x`` or ``offset``.

    Paper: https://arxiv.org/abs/1706.03762 (section 3.5)
    """

    def __init__(self, embed_dim: int, max_len: int = 1000, dropout: float = 0.0, *, base: float = 10000.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.embed_dim = _check_int("embed_dim", embed_dim, minimum=1)
        self.max_len = _check_int("max_len", max_len, minimum=0)
        self.base = _check_positive_float("base", base)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        table = sinusoidal_table(max_len, embed_dim, base=self.base, dtype=dtype, device=device)  # (max_len, E)
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """Return ``dropout(x + PE[offset : offset + L])``."""
        _check_tokens(x, self.embed_dim)
        offset = _check_int("offset", offset, minimum=0)
        L = x.shape[1]
        # the cached rows serve any dtype no more precise than the cache; otherwise compute them
        if offset + L <= self.max_len and self.table.dtype.itemsize >= x.dtype.itemsize:
            pe = self.table[offset : offset + L].to(x.dtype)  # (L, E)
        else:
            pe = sinusoidal_table(L, self.embed_dim, offset=offset, base=self.base, dtype=x.dtype,
                                  device=x.device)  # (L, E)
        return self.dropout(x + pe.to(x.device)[None])  # (B, L, E)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, max_len={self.max_len}, base={self.base}"


class LearnedPositionalEmbedding(nn.Module):
    """Add a learned vector per position (BERT / ViT style), then dropout.

    ``out = dropout(x + P[offset : offset + L])`` with ``P`` a ``(max_len, E)`` parameter initialised from
    ``N(0, 0.02^2)``. Positions at or past ``max_len`` have no vector and raise.

    Args:
        max_len: number of learned positions.
        embed_dim: ``E``.
        dropout: dropout after the addition (training only).

    Shape:
        ``x`` ``(B, L, E)`` -> ``(B, L, E)``.

    Raises:
        ValueError: ``offset + L > max_len`` (and bad sizes / inputs).
    """

    def __init__(self, max_len: int, embed_dim: int, dropout: float = 0.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.max_len = _check_int("max_len", max_len, minimum=1)
        self.embed_dim = _check_int("embed_dim", embed_dim, minimum=1)
        self.weight = nn.Parameter(torch.empty(max_len, embed_dim, device=device, dtype=dtype))  # (max_len, E)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """Return ``dropout(x + P[offset : offset + L])``."""
        _check_tokens(x, self.embed_dim)
        offset = _check_int("offset", offset, minimum=0)
        L = x.shape[1]
        if offset + L > self.max_len:
            raise ValueError(f"offset + L must be <= max_len = {self.max_len}, got offset {offset} + L {L}. "
                             "Build the module with a larger max_len, or use SinusoidalPositionalEncoding.")
        return self.dropout(x + self.weight[offset : offset + L][None])  # (B, L, E)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, embed_dim={self.embed_dim}"


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias: one scalar per (bucket, head), looked up per query/key pair.

    ``bias[0, h, i, j] = weight[bucket(j - (i + S - L)), h]`` with the bucket rule of
    :func:`attnkit.functional.positional.relative_position_bucket`. Pass the result to
    ``attention(..., bias=)``. T5 initialises the table from ``N(0, 1)`` (as ``nn.Embedding``) and does not
    scale scores by ``1/sqrt(d)``; that choice is the caller's.

    Args:
        num_heads: ``H``.
        num_buckets: table rows (32 in T5).
        max_distance: distance from which all keys share the last bucket (128 in T5).
        bidirectional: separate buckets for keys after the query (encoder) or not (decoder).

    Shape:
        ``forward(L, S=None)`` -> ``(1, H, L, S)``.

    Raises:
        TypeError / ValueError: bad sizes or lengths.

    Paper: https://arxiv.org/abs/1910.10683 (section 2.1)
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads = _check_int("num_heads", num_heads, minimum=1)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        # validate the bucket arguments once, on a dummy position
        relative_position_bucket(torch.zeros(1, dtype=torch.long), bidirectional=bidirectional,
                                 num_buckets=num_buckets, max_distance=max_distance)
        self.embedding = nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)

    def forward(self, query_len: int, key_len: int | None = None) -> torch.Tensor:
        """Return the bias ``(1, H, L, S)`` for ``L`` queries and ``S`` keys (default ``S = L``)."""
        key_len = query_len if key_len is None else key_len
        rel = relative_positions(query_len, key_len, device=self.embedding.weight.device)  # (L, S)
        buckets = relative_position_bucket(rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)  # (L, S)
        values = self.embedding(buckets)  # (L, S, H)
        return values.permute(2, 0, 1)[None]  # (1, H, L, S)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) for queries and keys in the ``(B, H, L, D)`` layout.

    Keys ``k`` hold positions ``offset, ..., offset + S - 1``; queries the last ``L`` of them
    (``offset + S - L, ...``), so a decoding step with a key cache passes the full keys and the new queries.
    Feature pairs are interleaved ``(x[2i], x[2i+1])`` as in the paper; see
    :func:`attnkit.functional.positional.apply_rotary`. No parameters.

    Args:
        head_dim: ``D`` (even).
        base: frequency base (10000).

    Shape:
        ``q`` ``(..., L, D)``, ``k`` ``(..., S, D)`` -> same shapes.

    Raises:
        TypeError / ValueError: odd ``head_dim``; inputs whose last dim is not ``head_dim``; ``L > S``.

    Paper: https://arxiv.org/abs/2104.09864
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = _check_int("head_dim", head_dim, minimum=2)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary rotates pairs of features), got {head_dim}")
        self.base = _check_positive_float("base", base)

    def rotate(self, x: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """Rotate one tensor ``(..., L, D)`` whose first position is ``offset``."""
        if isinstance(x, torch.Tensor) and x.shape[-1:] != (self.head_dim,):
            raise ValueError(f"x must have last dim head_dim = {self.head_dim}, got {tuple(x.shape)}")
        return apply_rotary(x, offset=offset, base=self.base)

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(q_rotated, k_rotated)``; ``offset`` is the position of the first key."""
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-1] != self.head_dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape (..., length, head_dim = {self.head_dim}), got {shape}")
        offset = _check_int("offset", offset, minimum=0)
        L, S = q.shape[-2], k.shape[-2]
        if L > S:
            raise ValueError(f"q must not be longer than k (queries are the last key positions), got L = {L} "
                             f"> S = {S}. For cross-attention rotate each with rotate(x, offset=...).")
        q_rot = apply_rotary(q, offset=offset + S - L, base=self.base)  # (..., L, D)
        k_rot = apply_rotary(k, offset=offset, base=self.base)  # (..., S, D)
        return q_rot, k_rot

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


class ALiBi(nn.Module):
    """Attention with Linear Biases: the per-head bias ``-m_h * distance``, for ``attention(..., bias=)``.

    Causal form (default, ``symmetric=False``): ``bias = m_h * (key pos - query pos)``, used with
    :func:`attnkit.masks.causal` (bottom-right). Symmetric form: ``-m_h * |key pos - query pos|`` for
    bidirectional attention. Slopes from :func:`attnkit.functional.positional.alibi_slopes`. No parameters.

    Args:
        num_heads: ``H``.
        symmetric: bidirectional form.

    Shape:
        ``forward(L, S=None)`` -> ``(1, H, L, S)``.

    Raises:
        TypeError / ValueError: bad ``num_heads`` or lengths.

    Paper: https://arxiv.org/abs/2108.12409
    """

    def __init__(self, num_heads: int, *, symmetric: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
        self.num_heads = _check_int("num_heads", num_heads, minimum=1)
        self.symmetric = symmetric
        self.register_buffer("slopes", alibi_slopes(num_heads, dtype=dtype, device=device), persistent=False)

    def forward(self, query_len: int, key_len: int | None = None) -> torch.Tensor:
        """Return the bias ``(1, H, L, S)`` for ``L`` queries and ``S`` keys (default ``S = L``)."""
        return alibi_bias(self.slopes, query_len, key_len, symmetric=self.symmetric)  # (1, H, L, S)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, symmetric={self.symmetric}"
