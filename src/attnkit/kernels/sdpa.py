"""PyTorch's fused ``F.scaled_dot_product_attention`` for dense, causal and padding masks.

The only work added around the fused call is turning an attnkit mask into SDPA's boolean ``attn_mask``
(same meaning: True = may attend), a causal mask with ``L == S`` into ``is_causal=True``, and a guard that
zeroes rows with no allowed key (PyTorch >= 2.5 already does; older builds returned NaN). The boolean mask and
its empty rows are remembered by the mask, so a mask reused across calls costs nothing after the first.
The log-sum-exp (``return_lse``) comes from the same fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``)
where it can run, else from the materialized scores. Under ``torch.compile`` / ``torch.export`` tracing the
guard is applied unconditionally, so the forward has no data-dependent Python branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit import scores as _scores
from attnkit.kernels._contract import is_dot
from attnkit.kernels.math import attention_weights, dense_mask, log_sum_exp, masked_scores
from attnkit.masks._base import tracing

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def supports(query, key, value, *, score, score_mod=None, normalize, dropout_p, return_weights, return_lse=False,
             **_) -> str | None:
    """``None`` if SDPA can serve the request, else the reason it cannot."""
    if not is_dot(score):
        return "SDPA computes dot-product scores only (score=scaled_dot or dot)"
    if normalize != "softmax":
        return "SDPA normalizes with softmax only"
    if score_mod is not None:
        return "SDPA takes no score_mod; use backend='tiled'"
    if return_weights and dropout_p > 0:
        return "SDPA cannot return the dropped-out weights it used; use backend='math'"
    if return_lse and dropout_p > 0:
        return "SDPA's log-sum-exp is not returned with dropout; use backend='math'"
    return None


def suits(query, key, value, **_) -> bool:
    return True


_CACHE_MAX = 1 << 26  # mask elements (64 MiB of bools) small enough to keep on the mask object between calls


_tracing = tracing


def _sdpa_mask(mask, query, key) -> tuple[Tensor, Tensor | None]:
    """SDPA's boolean ``attn_mask`` (..., L, S) for ``mask``, and the rows that allow no key (..., L, 1), or None
    when every row allows one. Both are remembered by the mask for its last shapes and device (and rebuilt when
    its tensors change); masks over ``_CACHE_MAX`` elements are rebuilt every call instead of being kept alive."""
    if _tracing():
        m = dense_mask(mask, query, key)
        return m, m.any(-1, keepdim=True).logical_not()

    def build():
        m = dense_mask(mask, query, key)  # (..., L, S)
        empty = m.any(-1, keepdim=True).logical_not_()  # (..., L, 1): the row allows no key
        return m, (empty if bool(empty.any()) else None)

    ckey = ("sdpa", query.shape[-2], key.shape[-2], query.ndim - 2, str(query.device))
    return mask.remember(ckey, build, keep=lambda v: v[0].numel() <= _CACHE_MAX)


def run(query, key, value, *, score, score_mod=None, mask, bias, normalize, scale, dropout_p, return_weights,
        return_lse=False):
    L, S = query.shape[-2], key.shape[-2]
    if score is _scores.dot and scale is None:
        scale = 1.0
    is_causal = False
    attn_mask = guard = None
    if mask is None or mask.is_full:
        pass
    elif mask.is_causal and L == S and bias is None:
        is_causal = True  # SDPA's causal is top-left aligned; identical to ours when L == S
    else:
        attn_mask, guard = _sdpa_mask(mask, query, key)  # (..., L, S) bool; rows with no key, or None
    if bias is not None:
        bias = bias.to(query.dtype)
        attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    lse = None
    flash = (return_lse and query.device.type == "cpu" and _FLASH_CPU is not None and query.ndim == 4
             and query.shape == key.shape[:-1] + (query.shape[-1],) and value.shape[-1] == query.shape[-1]
             and key.shape == value.shape)
    if flash:
        # the fused CPU kernel returns the log-sum-exp it computed (autograd covers its output); it takes an
        # additive mask in the query's dtype
        am = attn_mask
        if am is not None and am.dtype == torch.bool:
            am = torch.zeros(am.shape, dtype=query.dtype, device=am.device).masked_fill_(~am, float("-inf"))
        out, lse = _FLASH_CPU(query, key, value, dropout_p, is_causal, attn_mask=am, scale=scale)
        lse = lse.detach()
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )  # (..., L, Dv)
    if guard is not None:
        out = out.masked_fill(guard, 0.0)
    if return_lse:
        if lse is None:
            s, m = masked_scores(query, key, score=score, mask=mask, bias=bias, scale=scale)
            lse = log_sum_exp(s, m)
        else:
            lse = lse.to(torch.float32 if query.dtype != torch.float64 else torch.float64)
            if guard is not None:
                lse = lse.masked_fill(guard.squeeze(-1), float("-inf"))
    weights = None
    if return_weights:
        # the picture never changes the output: out stays SDPA's, weights come from the same equation
        weights = attention_weights(query, key, score=score, mask=mask, bias=bias, normalize=normalize, scale=scale)
    return out, weights, lse
