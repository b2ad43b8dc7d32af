"""The plain path: scores -> (+ bias) -> normalizer -> (dropout) -> weights @ value.

This is the readable reference every fast kernel must agree with; it materializes the ``(..., L, S)`` scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.functional import scores as _scores
from attnkit.functional.softmax import get_normalizer
from attnkit.masks import Mask


def compute_scores(query: Tensor, key: Tensor, score, scale: float | None) -> Tensor:
    """``score(q, k)``, with ``scale`` replacing ``1/sqrt(d)`` for ``scaled_dot`` and multiplying otherwise.

    Parameter-free scores of half-precision inputs are computed in float32: ``q . k`` of float16 inputs can
    exceed 65504 even when the scaled score does not.
    """
    if query.dtype in (torch.float16, torch.bfloat16) and score in _UPCAST:
        query, key = query.float(), key.float()
    if score is _scores.scaled_dot:
        return _scores.scaled_dot(query, key, scale=scale)  # (..., L, S)
    scores = score(query, key)  # (..., L, S)
    return scores if scale is None else scores * scale


_UPCAST = (_scores.dot, _scores.scaled_dot, _scores.gaussian)


def dense_mask(mask: Mask | None, query: Tensor, key: Tensor) -> Tensor | None:
    """Materialize ``mask`` for scores ``(..., L, S)`` built from ``query`` and ``key``."""
    if mask is None:
        return None
    return mask.materialize(query.shape[-2], key.shape[-2], device=query.device, batch_ndim=query.ndim - 2)


def attention_weights(query, key, *, score, mask, bias, normalize, scale) -> Tensor:
    """Weights ``normalize(score(q, k) * scale + bias, mask)``.

    Shape:
        ``(..., L, S)``.
    """
    # A = score(Q, K)
    scores = compute_scores(query, key, score, scale)  # (..., L, S)
    if bias is not None:
        # A + bias
        scores = scores + bias
    # A' = normalize(A) over the allowed keys
    weights = get_normalizer(normalize)(scores, dense_mask(mask, query, key))  # (..., L, S)
    return weights.to(query.dtype)  # float32 scores of half inputs go back to the inputs' dtype


def math_attention(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights):
    weights = attention_weights(query, key, score=score, mask=mask, bias=bias, normalize=normalize, scale=scale)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    # O = A' V
    out = weights @ value  # (..., L, Dv)
    return (out, weights) if return_weights else out
