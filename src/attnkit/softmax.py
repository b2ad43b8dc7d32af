"""Normalizers: turn scores into attention weights, respecting a boolean mask (True = may attend).

``masked_softmax`` is the default. Seed 000 notes the softmax is not sacred: ``relu``, ``sigmoid`` or no
normalization at all (``none``) also work; those weigh each allowed key independently (rows need not sum to 1).

Every normalizer returns exactly zero for masked-out pairs, so a query with no allowed key gets zero weights
and, after ``weights @ value``, zero output: never NaN, in float32, float16 and bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["masked_softmax", "NORMALIZERS", "get_normalizer"]


def masked_softmax(scores: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` restricted to allowed entries; rows with nothing allowed give all zeros.

    Computed in float32 for half-precision inputs (scores above 65504 would overflow float16) and returned in
    the input's dtype. Masked entries are filled with ``-inf`` (never a literal like ``-1e9``), the row maximum
    of an empty row is replaced by 0, and the denominator of an empty row by 1, so values and gradients stay
    finite. NaN or inf sitting in masked-out scores does not leak.

    Args:
        scores: attention scores.
        mask: boolean, broadcastable to ``scores``; True = may attend. ``None`` = all allowed.

    Shape:
        scores ``(..., L, S)``, mask broadcastable to it -> weights ``(..., L, S)``.
    """
    if scores.shape[dim] == 0:  # no keys at all: nothing to weigh (out = weights @ value is then zero)
        return scores.clone()
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if mask is not None:
        work = work.masked_fill(~mask, float("-inf"))
    # softmax(x)_j = exp(x_j - m) / sum_j' exp(x_j' - m), with m = max_j x_j (0 for an empty row)
    row_max = work.amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    exp = torch.exp(work - row_max)  # masked entries: exp(-inf) = 0
    denom = exp.sum(dim=dim, keepdim=True)
    weights = exp / torch.where(denom > 0, denom, torch.ones_like(denom))
    return weights.to(scores.dtype)


def _elementwise(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor | None], Tensor]:
    def normalize(scores: Tensor, mask: Tensor | None = None) -> Tensor:
        weights = fn(scores)
        if mask is not None:
            weights = weights.masked_fill(~mask, 0.0)
        return weights

    normalize.__name__ = fn.__name__
    return normalize


def _identity(scores: Tensor) -> Tensor:
    return scores


#: name -> normalizer(scores, mask) -> weights
NORMALIZERS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "softmax": masked_softmax,
    "none": _elementwise(_identity),
    "relu": _elementwise(torch.relu),
    "sigmoid": _elementwise(torch.sigmoid),
}


def get_normalizer(normalize: str | Callable) -> Callable[[Tensor, Tensor | None], Tensor]:
    """Resolve ``normalize`` (a name in :data:`NORMALIZERS` or a callable ``(scores, mask) -> weights``)."""
    if callable(normalize):
        return normalize
    if isinstance(normalize, str) and normalize in NORMALIZERS:
        return NORMALIZERS[normalize]
    raise ValueError(
        f"normalize must be one of {sorted(NORMALIZERS)} or a callable (scores, mask) -> weights; "
        f"got {normalize!r}."
    )
