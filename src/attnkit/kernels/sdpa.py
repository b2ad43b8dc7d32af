"""PyTorch's fused ``F.scaled_dot_product_attention`` for dense, causal and padding masks.

The only work added around the fused call is turning an attnkit mask into SDPA's boolean ``attn_mask``
(same meaning: True = may attend), a causal mask with ``L == S`` into ``is_causal=True``, and a guard that
zeroes rows with no allowed key (PyTorch >= 2.5 already does; older builds returned NaN).
"""

from __future__ import annotations

import torch.nn.functional as F

from attnkit.functional import scores as _scores
from attnkit.kernels.math import attention_weights, dense_mask
from attnkit.masks import Causal, Full


def supports(*, score, normalize, dropout_p, return_weights, **_) -> str | None:
    """``None`` if SDPA can serve the request, else the reason it cannot."""
    if score not in (_scores.scaled_dot, _scores.dot):
        return "SDPA computes dot-product scores only (score=scaled_dot or dot)"
    if normalize != "softmax":
        return "SDPA normalizes with softmax only"
    if return_weights and dropout_p > 0:
        return "SDPA cannot return the dropped-out weights it used; use backend='math'"
    return None


def sdpa_attention(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights):
    L, S = query.shape[-2], key.shape[-2]
    if score is _scores.dot and scale is None:
        scale = 1.0
    is_causal = False
    attn_mask = None
    guard = None
    if mask is None or isinstance(mask, Full):
        pass
    elif type(mask) is Causal and L == S and bias is None:
        is_causal = True  # SDPA's causal is top-left aligned; identical to ours when L == S
    else:
        attn_mask = guard = dense_mask(mask, query, key)  # (..., L, S) bool
    if bias is not None:
        bias = bias.to(query.dtype)
        attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )  # (..., L, Dv)
    if guard is not None:
        rows = guard.any(-1, keepdim=True)  # (..., L, 1): does the row allow any key?
        if not bool(rows.all()):
            out = out.masked_fill(~rows, 0.0)
    if not return_weights:
        return out
    # the picture never changes the output: out stays SDPA's, weights come from the same equation
    weights = attention_weights(query, key, score=score, mask=mask, bias=bias, normalize=normalize, scale=scale)
    return out, weights


