"""Nadaraya-Watson attention pooling: average, Gaussian-kernel and learnable-width kernel regression.

``f(x) = sum_i a(x, x_i) y_i`` with queries ``x``, keys ``x_i`` and values ``y_i``. The three kinds differ
only in the score they hand to :func:`attnkit.functional.attention.attention` (injection, not a flag inside
a shared forward):

- ``"average"``: score 0 for every key, so ``a = 1/n`` and ``f(x) = mean(y)``;
- ``"gaussian"``: ``score = -||x - x_i||^2 / 2``, so ``a = softmax`` of it (Gaussian kernel, fixed width);
- ``"parametric"``: ``score = -(w ||x - x_i||)^2 / 2`` with a learnable scalar ``w`` (initialised to 1).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.functional.attention import attention
from attnkit.functional.scores import gaussian

__all__ = ["NadarayaWatson"]

_KINDS = ("average", "gaussian", "parametric")


def _zero_score(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Score 0 for every pair, ``(..., L, D), (..., S, D) -> (..., L, S)``: softmax gives uniform weights."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    return torch.zeros(*batch, q.shape[-2], k.shape[-2], dtype=q.dtype, device=q.device)  # (..., L, S)


class NadarayaWatson(nn.Module):
    """Nadaraya-Watson kernel regression as attention pooling.

    ``f(x) = sum_i softmax_i(score(x, x_i)) y_i`` with the score chosen by ``kind`` (see the module docstring).

    ============  ==================
    symbol        argument
    ============  ==================
    ``x``         ``queries``
    ``x_i``       ``keys``
    ``y_i``       ``values``
    ``w``         ``self.w`` (parametric only)
    ============  ==================

    Args:
        kind: ``"average"``, ``"gaussian"`` or ``"parametric"``.

    Shape:
        scalar inputs: queries ``(B, L)``, keys ``(B, S)``, values ``(B, S)`` -> out ``(B, L)``;
        vector inputs: queries ``(B, L, D)``, keys ``(B, S, D)``, values ``(B, S, Dv)`` -> out ``(B, L, Dv)``;
        weights ``(B, L, S)``.

    Raises:
        ValueError / TypeError: unknown ``kind``; inputs of mismatched rank or size (named in the message).

    Reference: d2l.ai, "Attention Pooling by Similarity" (Nadaraya 1964, Watson 1964).
    """

    def __init__(self, kind: str = "gaussian") -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "parametric":
            self.w = nn.Parameter(torch.tensor(1.0))  # ()
            self.score = self._parametric_score
        elif kind == "gaussian":
            self.score = gaussian
        else:
            self.score = _zero_score

    def _parametric_score(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # score = -(w ||x - x_i||)^2 / 2
        return gaussian(q, k, w=self.w)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                return_weights: bool = False):
        """Pool ``values`` for each query; returns ``out`` or ``(out, weights)``."""
        for name, t in (("queries", queries), ("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}"
                                + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""))
        scalar = queries.dim() == 2
        if queries.dim() not in (2, 3):
            raise ValueError(f"queries must have shape (B, L) or (B, L, D), got {tuple(queries.shape)}")
        if keys.dim() != queries.dim():
            raise ValueError(f"keys must have the rank of queries: (B, S) for queries (B, L), (B, S, D) for "
                             f"(B, L, D); got keys {tuple(keys.shape)} and queries {tuple(queries.shape)}")
        if not scalar and keys.shape[-1] != queries.shape[-1]:
            raise ValueError(f"keys must have the feature size D = {queries.shape[-1]} of queries, "
                             f"got {tuple(keys.shape)}")
        allowed = (2, 3) if scalar else (3,)
        if values.dim() not in allowed or values.shape[:2] != keys.shape[:2]:
            expected = "(B, S) or (B, S, Dv)" if scalar else "(B, S, Dv)"
            raise ValueError(f"values must have shape {expected} matching keys {tuple(keys.shape)}, "
                             f"got {tuple(values.shape)}")
        vector_values = values.dim() == 3
        q = queries[..., None] if scalar else queries  # (B, L, D)
        k = keys[..., None] if scalar else keys  # (B, S, D)
        v = values if vector_values else values[..., None]  # (B, S, Dv)
        out, weights = attention(q, k, v, score=self.score, return_weights=True)  # (B, L, Dv), (B, L, S)
        if not vector_values:
            out = out[..., 0]  # (B, L)
        return (out, weights) if return_weights else out

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
