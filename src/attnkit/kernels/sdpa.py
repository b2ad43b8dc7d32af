"""PyTorch's fused ``F.scaled_dot_product_attention`` for dense, causal and padding masks.

The only work added around the fused call is turning an attnkit mask into SDPA's boolean ``attn_mask``
(same meaning: True = may attend), a causal mask with ``L == S`` into ``is_causal=True``, and a guard that
zeroes rows with no allowed key (PyTorch >= 2.5 already does; older builds returned NaN). The boolean mask and
its empty rows are remembered on the mask object, so a mask reused across calls costs nothing after the first.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from attnkit.functional import scores as _scores
from attnkit.kernels._tiles import cached_on_mask
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


_CACHE_MAX = 1 << 26  # mask elements (64 MiB of bools) small enough to keep on the mask object between calls


def _sdpa_mask(mask, query, key) -> tuple[Tensor, Tensor | None]:
    """SDPA's boolean ``attn_mask`` (..., L, S) for ``mask``, and the rows that allow no key (..., L, 1), or None
    when every row allows one. Both are remembered on the mask object for its last shape and device (and rebuilt
    when its tensors change), so a mask reused from call to call is not materialized and scanned again each time;
    masks over ``_CACHE_MAX`` elements are rebuilt every call instead of being kept alive."""

    def build():
        m = dense_mask(mask, query, key)  # (..., L, S)
        empty = m.any(-1, keepdim=True).logical_not_()  # (..., L, 1): the row allows no key
        return m, (empty if bool(empty.any()) else None)

    ckey = ("sdpa", query.shape[-2], key.shape[-2], query.ndim - 2, str(query.device))
    return cached_on_mask(mask, "_attnkit_sdpa", ckey, build, keep=lambda v: v[0].numel() <= _CACHE_MAX)


def sdpa_attention(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights):
    L, S = query.shape[-2], key.shape[-2]
    if score is _scores.dot and scale is None:
        scale = 1.0
    is_causal = False
    attn_mask = guard = None
    if mask is None or isinstance(mask, Full):
        pass
    elif type(mask) is Causal and L == S and bias is None:
        is_causal = True  # SDPA's causal is top-left aligned; identical to ours when L == S
    else:
        attn_mask, guard = _sdpa_mask(mask, query, key)  # (..., L, S) bool; rows with no key, or None
    if bias is not None:
        bias = bias.to(query.dtype)
        attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )  # (..., L, Dv)
    if guard is not None:
        out = out.masked_fill(guard, 0.0)
    if not return_weights:
        return out
    # the picture never changes the output: out stays SDPA's, weights come from the same equation
    weights = attention_weights(query, key, score=score, mask=mask, bias=bias, normalize=normalize, scale=scale)
    return out, weights


