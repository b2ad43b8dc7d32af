"""The plain path: scores -> (+ bias) -> normalizer -> (dropout) -> weights @ value.

This is the readable reference every fast kernel must agree with; it materializes the ``(..., L, S)`` scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit import scores as _scores
from attnkit.kernels._contract import apply_score_mod
from attnkit.masks import Mask
from attnkit.softmax import get_normalizer


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


def _index_grids(query: Tensor, key: Tensor):
    """FlexAttention's ``b, h, q_idx, kv_idx`` for scores (..., L, S): broadcastable index tensors."""
    L, S, dev = query.shape[-2], key.shape[-2], query.device
    lead = max(query.ndim, key.ndim) - 2
    qi = torch.arange(L, device=dev).view(L, 1)  # (L, 1)
    kj = torch.arange(S, device=dev).view(1, S)  # (1, S)
    if lead >= 2:
        B, H = max(query.shape[-4], key.shape[-4]), max(query.shape[-3], key.shape[-3])
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
    elif lead == 1:
        b = torch.arange(max(query.shape[0], key.shape[0]), device=dev).view(-1, 1, 1)
        h = torch.zeros((), dtype=torch.long, device=dev)
    else:
        b = h = torch.zeros((), dtype=torch.long, device=dev)
    return b, h, qi, kj


def masked_scores(query, key, *, score, score_mod=None, mask, bias, scale) -> tuple[Tensor, Tensor | None]:
    """Scores ``score(q, k) * scale (+ score_mod) + bias`` and the dense boolean mask (or None)."""
    # A = score(Q, K)
    scores = compute_scores(query, key, score, scale)  # (..., L, S)
    if score_mod is not None:
        # A = score_mod(A, b, h, q_idx, kv_idx)
        scores = apply_score_mod(score_mod, scores, _index_grids(query, key))
    if bias is not None:
        # A + bias
        scores = scores + bias
    return scores, dense_mask(mask, query, key)


def attention_weights(query, key, *, score, mask, bias, normalize, scale, score_mod=None) -> Tensor:
    """Weights ``normalize(score(q, k) * scale + bias, mask)``.

    Shape:
        ``(..., L, S)``.
    """
    scores, m = masked_scores(query, key, score=score, score_mod=score_mod, mask=mask, bias=bias, scale=scale)
    # A' = normalize(A) over the allowed keys
    weights = get_normalizer(normalize)(scores, m)  # (..., L, S)
    return weights.to(query.dtype)  # float32 scores of half inputs go back to the inputs' dtype


def log_sum_exp(scores: Tensor, m: Tensor | None) -> Tensor:
    """Natural-log log-sum-exp over the allowed keys, -inf for a row with none: (..., L), no gradient."""
    s = scores.detach()
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    return torch.logsumexp(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, -1)


def supports(query, key, value, *, normalize, return_lse=False, **_) -> str | None:
    if return_lse and normalize != "softmax":
        return "the log-sum-exp is defined for normalize='softmax' only"
    return None


def suits(query, key, value, **_) -> bool:
    return True


def run(query, key, value, *, score, score_mod, mask, bias, normalize, scale, dropout_p, return_weights,
        return_lse):
    scores, m = masked_scores(query, key, score=score, score_mod=score_mod, mask=mask, bias=bias, scale=scale)
    # A' = normalize(A) over the allowed keys
    weights = get_normalizer(normalize)(scores, m).to(query.dtype)  # (..., L, S)
    lse = log_sum_exp(scores, m) if return_lse else None
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    # O = A' V
    out = weights @ value  # (..., L, Dv)
    return out, (weights if return_weights else None), lse

