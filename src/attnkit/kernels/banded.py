"""Band-limited masks at moderate lengths: query blocks against the keys their band reaches, one fused call each.

For a mask whose allowed pairs all lie in a band (``mask.band()``: ``window(16, 16) & padding(lengths)``, a
window and packed documents, ...), the queries are cut into blocks of ``b`` rows; block ``[i0, i1)`` can only see
keys ``[i0' - left, i1' - 1 + right]`` (``i' = i + S - L``), ``b + left + right`` of them. Each block runs
PyTorch's fused attention (``F.scaled_dot_product_attention``, forward and backward) on those keys with the
mask evaluated on that block alone (:func:`attnkit.masks.allowed_on`): ``L (b + left + right)`` pairs instead of
``L S``, no ``L x S`` tensor, any mask inside the band. The window kernel (strided key views) is faster for a
plain band on long inputs; this one serves what it cannot (a band and something else), where the whole problem
is too small for tiles of 128 to skip anything.

Shape letters: ``*b`` batch dims, L queries, S keys, D head dim, Dv value dim, b rows per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.kernels._contract import dot_scale, softmax_dot_reason
from attnkit.masks import allowed_on


def supports(query, key, value, *, mask=None, return_weights=False, return_lse=False, **request) -> str | None:
    reason = softmax_dot_reason(**request)
    if reason:
        return reason
    if mask is None or mask.band() is None:
        return f"it needs a mask inside a finite band (mask.band(): a window, or a window & something); got {mask!r}"
    if return_weights or return_lse:
        return "it returns neither weights nor the log-sum-exp; use backend='blocksparse'"
    return None


def suits(query, key, value, *, mask=None, **_) -> bool:
    """A band of at most a quarter of the keys that is not a plain window (the window kernel's), on problems
    below 512 x 512 pairs (from there block-sparse tiles skip as much)."""
    left, right = mask.band()
    L, S = query.shape[-2], key.shape[-2]
    return mask.window() is None and L * S < 512 * 512 and 4 * (left + right + 1) <= S


def run(query, key, value, *, score, mask, scale, **_):
    left, right = mask.band()
    L, S = query.shape[-2], key.shape[-2]
    shift, nd = S - L, max(query.ndim, key.ndim) - 2
    b = max(2 * (left + right), 16)  # rows per block: the band's keys are about a third of what a block reads
    s = dot_scale(query, score, scale)
    outs = []
    for i0 in range(0, L, b):
        i1 = min(i0 + b, L)
        k0, k1 = max(i0 + shift - left, 0), min(i1 - 1 + shift + right + 1, S)  # keys the block can reach
        if k1 <= k0:
            outs.append(query.new_zeros(*torch.broadcast_shapes(query.shape[:-2], value.shape[:-2]), i1 - i0,
                                        value.shape[-1]))
            continue
        qi = torch.arange(i0, i1, device=query.device).unsqueeze(0)  # (1, b)
        kj = torch.arange(k0, k1, device=query.device).unsqueeze(0)  # (1, kb)
        allowed = allowed_on(mask, qi, kj, L, S, nd).squeeze(-3)  # (*mb, b, kb)
        empty = ~allowed.any(-1, keepdim=True)  # (*mb, b, 1): a row that sees nothing gets 0
        o = F.scaled_dot_product_attention(query[..., i0:i1, :], key[..., k0:k1, :], value[..., k0:k1, :],
                                           attn_mask=allowed, scale=s)  # (*b, b, Dv)
        outs.append(o.masked_fill(empty, 0.0) if bool(empty.any()) else o)
    return torch.cat(outs, dim=-2), None, None  # (*b, L, Dv)
