"""Sliding-window (truncated) softmax attention: each query block reads one contiguous slice of keys.

Query ``i`` may attend to keys ``j`` with ``i' - left <= j <= i' + right``, ``i' = i + S - L`` (bottom-right
aligned, widths inclusive, as ``attnkit.masks.window``; ``right=0`` is causal-window attention). For a block
of ``Bq`` queries starting at row ``i0`` every key it may need lies in the slice
``[i0' - left, i0' + Bq - 1 + right]`` of ``Bq + left + right`` keys, so the kernel gathers that slice,
computes a ``(Bq, Bq + left + right)`` score tile, masks the band's two triangular edges and the sequence
ends, and runs the softmax on it. Work and memory are O(L * (Bq + left + right)); nothing is L x S.

The tiles run through the block-sparse engine (:mod:`attnkit.kernels.blocksparse`): custom backward that
recomputes the weights from the saved log-sum-exp, float32 accumulation for half inputs, empty rows -> 0.

Shape letters: ``*b`` batch dims, L queries, S keys, D head dim, Dv value dim, Bq rows per block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit import masks as _masks
from attnkit.kernels._tiles import mask_on_tiles
from attnkit.kernels.blocksparse import Group, Plan, _check, run_plan

__all__ = ["window_attention", "window_plan"]


def window_plan(L: int, S: int, left: int, right: int, *, block: int = 64, device=None,
                extra: _masks.Mask | None = None, batch_ndim: int = 2) -> Plan:
    """Tiles of a ``window(left, right)`` mask: one group, query block ``b`` reads keys from
    ``b * block + S - L - left`` on, ``block + left + right`` of them. ``extra`` (e.g. padding) is and-ed in.
    """
    nbq = -(-L // block)
    Kw = block + left + right
    start = torch.arange(nbq, device=device) * block + (S - L - left)  # (nbq,)
    kj = start.unsqueeze(-1) + torch.arange(Kw, device=device)  # (nbq, Kw), may run outside [0, S)
    qi = torch.arange(nbq, device=device).unsqueeze(-1) * block + torch.arange(block, device=device)  # (nbq, Bq)
    win = _masks.Window(left, right)
    mask = win if extra is None else _masks.And(win, extra)
    allowed = mask_on_tiles(mask, qi, kj, L, S, batch_ndim)  # (*mb, nbq, Bq, Kw)
    # blocks whose whole slice lies outside [0, S) (possible when L > S) compute nothing: drop them
    live = ((kj >= 0) & (kj < S)).any(-1)  # (nbq,)
    if not bool(live.all()):
        keep = torch.nonzero(live).flatten()
        return Plan(L, S, block, [Group(keep, kj[keep].clamp(0, max(S - 1, 0)),
                                        allowed.index_select(-3, keep))] if keep.numel() else [])
    return Plan(L, S, block, [Group(torch.arange(nbq, device=device), kj.clamp(0, max(S - 1, 0)), allowed)])


def window_attention(query: Tensor, key: Tensor, value: Tensor, *, left: int, right: int,
                     scale: float | None = None, block: int = 64,
                     return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention restricted to a band: query i sees keys i' - left .. i' + right (i' = i + S - L).

    ``out_i = sum_{j in band(i)} softmax_j(scale q_i . k_j) v_j``; rows whose band misses ``[0, S)`` give 0.

    ==========  ===============================================
    symbol      argument
    ==========  ===============================================
    q, k, v     ``query``, ``key``, ``value``
    w_l, w_r    ``left``, ``right`` (inclusive widths)
    scale       ``scale`` (default 1/sqrt(D))
    ==========  ===============================================

    Args:
        query, key, value: floating tensors of one dtype; batch dims broadcast.
        left, right: keys before / after the aligned diagonal (>= 0; ``right=0`` = causal window).
        scale: score multiplier.
        block: query rows per tile; a tile holds ``block + left + right`` keys.
        return_weights: also return dense weights (*b, L, S), rebuilt from the saved log-sum-exp.

    Returns:
        ``out`` (*b, L, Dv) or ``(out, weights)``.

    Shape:
        query (*b, L, D), key (*b, S, D), value (*b, S, Dv) -> out (*b, L, Dv).

    Raises:
        TypeError/ValueError for bad tensors, negative or non-int widths, or a bad block.
    """
    _check(query, key, value)
    for name, val in (("left", left), ("right", right), ("block", block)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int; got {type(val).__name__} ({val!r}).")
    if left < 0 or right < 0:
        raise ValueError(f"left and right must be >= 0 (inclusive window widths); got left={left}, right={right}.")
    if block < 1:
        raise ValueError(f"block must be >= 1; got {block}.")
    L, S = query.shape[-2], key.shape[-2]
    plan = window_plan(L, S, left, right, block=block, device=query.device,
                       batch_ndim=max(query.ndim, key.ndim) - 2)
    return run_plan(query, key, value, plan, scale=scale, return_weights=return_weights)
