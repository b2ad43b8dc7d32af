"""Tile-by-tile softmax attention with a ``score_mod``: FlexAttention's programming model, eager, with backward.

The plan (:class:`attnkit.masks.BlockMask`) lists each query block's non-empty key tiles; blocks with the same
number of tiles form a group and are computed together, one step of a few blocks at a time:

    S = scale Q_b K_t^T                      (n, g, Bq, Kw)   only the block's tiles
    S' = score_mod(S, b, h, q_idx, kv_idx)   with that tile's indices (broadcastable (n|1, g|1, Bq|1, Kw|1))
    S' = -inf where a partial tile forbids   (full tiles are not masked, empty tiles are never computed)
    lse = log sum_j exp S'  ;  O = exp(S' - lse) V_t

Forward and backward are written by hand (:mod:`attnkit.kernels.tiled_backward`): the backward recomputes each
tile's scores, ``score_mod`` included, from the saved log-sum-exp, so tensors the ``score_mod`` captures (a
learnable ALiBi slope, a relative-bias table) get their gradients and nothing of size ``L x S`` is kept. When
weights are asked for, each step instead runs under ``torch.utils.checkpoint`` (autograd through the weights).
Accumulation is in float32 for half inputs (float64 stays float64). A row with no allowed key: zero output,
``lse = -inf``, zero gradients.

Weights on request: dense ``(*b, L, S)`` or ``"sparse"``, a coalesced ``torch.sparse_coo_tensor`` holding only
the computed pairs (pictures of long sequences without an ``L x S`` tensor).

Shape letters: ``*b`` batch dims flattened to N, L queries, S keys, D head dim, Dv value dim, Bq rows per block,
Kw keys per block of a group, g blocks of a step, n batch rows of a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnkit.kernels._contract import apply_score_mod, split_steps
from attnkit.masks import BlockMask, Group

__all__ = ["tiled_attention"]

_BUDGET = 1 << 20  # score elements per step (batch rows x blocks x Bq x Kw) of the autograd path (weights)
_FAST_BUDGET = 1 << 18  # ... of the hand-written path: a step's scores (1 MiB in float32) stay in the L2 cache


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(t: Tensor, batch: tuple) -> Tensor:
    """(*mb, X, Y, Z) with ``*mb`` broadcastable to ``batch`` -> (N|1, X, Y, Z)."""
    if math.prod(t.shape[:-3]) <= 1:
        return t.reshape(1, *t.shape[-3:])
    return t.expand(*batch, *t.shape[-3:]).reshape(math.prod(batch), *t.shape[-3:])


def _keep(grp: Group, a: int, b: int, n0: int, n1: int, batch: tuple, Bq: int, device) -> Tensor | None:
    """Boolean "may attend" (n|1, g, Bq, Kw) of a step, or None when every score of it is allowed."""
    if grp.allowed is not None:
        al = _flat(grp.allowed, batch)  # (N|1, G, Bq, Kw)
        return al[:, a:b] if al.shape[0] == 1 else al[n0:n1, a:b]
    if grp.part_g is None or grp.part_g.numel() == 0:
        return None
    lo, hi = torch.searchsorted(grp.part_g, torch.tensor([a, b], device=device)).tolist()
    if lo == hi:
        return None
    f = _flat(grp.forbid[lo:hi].movedim(0, -3), batch).movedim(-3, 0)  # (p, N|1, Bq, Bk)
    f = f if f.shape[1] == 1 else f[:, n0:n1]  # (p, n|1, Bq, Bk)
    Kw = grp.kidx.shape[1]
    keep = torch.ones(f.shape[1], b - a, Bq, Kw // Bq, Bq, dtype=torch.bool, device=device)
    keep[:, grp.part_g[lo:hi] - a, :, grp.part_t[lo:hi]] = ~f  # the partial tiles: (p, n|1, Bq, Bk)
    return keep.flatten(-2)  # (n|1, g, Bq, Kw)


def _head_index(n0: int, n1: int, batch: tuple, device) -> tuple[Tensor, Tensor]:
    """FlexAttention's ``b`` and ``h`` for flattened batch rows [n0, n1): (n, 1, 1, 1) each."""
    n = torch.arange(n0, n1, device=device).view(-1, 1, 1, 1)
    H = batch[-1] if len(batch) >= 2 else 1
    return (n // H, n % H) if len(batch) >= 2 else (n, torch.zeros_like(n))


def _step(qs: Tensor, kb: Tensor, vb: Tensor, scale: float, score_mod, idx, keep: Tensor | None):
    """One step's output (n, g, Bq, Dv), log-sum-exp (n, g, Bq) and weights (n, g, Bq, Kw)."""
    # S = scale Q K^T
    s = torch.matmul(qs, kb.transpose(-1, -2)) * scale  # (n, g, Bq, Kw)
    if score_mod is not None:
        # S' = score_mod(S, b, h, q_idx, kv_idx)
        s = apply_score_mod(score_mod, s, idx)
    if keep is not None:
        s = torch.where(keep, s, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with nothing allowed: 0, not -inf
    p = torch.exp(s - m)  # (n, g, Bq, Kw)
    l = p.sum(-1, keepdim=True)
    l_safe = torch.where(l > 0, l, torch.ones_like(l))
    w = p / l_safe
    # O = softmax(S') V
    o = torch.matmul(w, vb)  # (n, g, Bq, Dv)
    lse = torch.where(l > 0, m + torch.log(l_safe), torch.full_like(l, float("-inf"))).squeeze(-1)
    return o, lse, w


def tiled_attention(query: Tensor, key: Tensor, value: Tensor, plan: BlockMask, *, scale: float | None = None,
                    score_mod: Callable | None = None, return_weights: bool | str = False,
                    return_lse: bool = False):
    """Softmax attention on the tiles of ``plan`` with an optional ``score_mod`` (see the module docstring).

    Args:
        query, key, value: floating tensors, batch dims broadcast (heads layout ``(B, H, L, D)`` for
            ``score_mod``'s ``b`` and ``h``).
        plan: the mask's :class:`~attnkit.masks.BlockMask` for ``(L, S)``.
        scale: score multiplier (default ``1/sqrt(D)``), applied before ``score_mod``.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score``, FlexAttention's signature.
        return_weights: ``True`` for dense weights (*b, L, S), ``"sparse"`` for a sparse COO tensor.
        return_lse: also return the natural-log log-sum-exp (*b, L) (-inf on rows with no key).

    Returns:
        ``(out, weights or None, lse or None)``.

    Shape:
        query (*b, L, D), key (*b, S, D), value (*b, S, Dv) -> out (*b, L, Dv).
    """
    batch = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    L, D, S, Dv = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 1.0
    N, acc, dev, Bq = math.prod(batch), _acc(query.dtype), query.device, plan.block
    nbq = -(-L // Bq)
    q = query.expand(*batch, L, D).reshape(N, L, D).to(acc)
    k = key.expand(*batch, S, D).reshape(N, S, D).to(acc)
    v = value.expand(*batch, S, Dv).reshape(N, S, Dv).to(acc)
    if nbq * Bq != L:
        q = torch.cat([q, q.new_zeros(N, nbq * Bq - L, D)], 1)
    qb = q.reshape(N * nbq, Bq, D)  # whole query blocks as rows
    if not return_weights:  # the hand-written forward/backward: nothing kept but q, k, v, out, lse
        from attnkit.kernels.tiled_backward import TiledAttention, _Steps, captured_tensors

        captured = captured_tensors(score_mod, acc, dev) if score_mod is not None else []
        steps = _Steps(plan, N, L, batch, _FAST_BUDGET, lambda grp, a, b, n0, n1: _keep(grp, a, b, n0, n1, batch,
                                                                                        Bq, dev), dev)
        out, lse_all = TiledAttention.apply(q, k, v, steps, float(scale), score_mod, *captured)
        out = out.view(N, nbq * Bq, Dv)[:, :L].reshape(*batch, L, Dv).to(query.dtype)
        lse_out = lse_all.view(N, nbq * Bq)[:, :L].reshape(*batch, L) if return_lse else None
        return out, None, lse_out
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    rows_all, outs, lses, weights = [], [], [], []
    for grp in plan.groups:
        G, Kw = grp.kidx.shape
        for (n0, n1), (a, b) in split_steps(G, N, Bq * Kw, _BUDGET):
            n, g = n1 - n0, b - a
            rows = (torch.arange(n0, n1, device=dev).view(-1, 1) * nbq + grp.qblocks[a:b]).flatten()  # (n * g,)
            flat = grp.kidx[a:b].flatten()  # (g * Kw,)
            qs = qb.index_select(0, rows).view(n, g, Bq, D)
            kb = k[n0:n1].index_select(1, flat).view(n, g, Kw, D)
            vb = v[n0:n1].index_select(1, flat).view(n, g, Kw, Dv)
            keep = _keep(grp, a, b, n0, n1, batch, Bq, dev)
            idx = None
            if score_mod is not None:
                bi, hi = _head_index(n0, n1, batch, dev)
                qi = (grp.qblocks[a:b].view(1, g, 1, 1) * Bq + torch.arange(Bq, device=dev).view(1, 1, Bq, 1))
                idx = (bi, hi, qi.clamp(max=max(L - 1, 0)), grp.kidx[a:b].view(1, g, 1, Kw))
            args = (qs, kb, vb, float(scale), score_mod, idx, keep)
            if grad:
                o, lse, w = checkpoint(_step, *args, use_reentrant=False)
            else:
                o, lse, w = _step(*args)
            rows_all.append(rows)
            outs.append(o.reshape(n * g, Bq, Dv))
            lses.append(lse.reshape(n * g, Bq))
            if return_weights:
                weights.append((n0, n1, grp.qblocks[a:b], grp.kidx[a:b], w))
    out = q.new_zeros(N * nbq, Bq, Dv)
    lse_all = q.new_full((N * nbq, Bq), float("-inf"))
    if rows_all:
        rows = torch.cat(rows_all)
        out = out.index_copy(0, rows, torch.cat(outs))
        lse_all = lse_all.index_copy(0, rows, torch.cat(lses))
    out = out.view(N, nbq * Bq, Dv)[:, :L].reshape(*batch, L, Dv).to(query.dtype)
    lse_out = lse_all.view(N, nbq * Bq)[:, :L].reshape(*batch, L) if return_lse else None
    w_out = None
    if return_weights:
        w_out = _assemble(weights, batch, N, L, S, Bq, query.dtype, sparse=return_weights == "sparse", device=dev)
    return out, w_out, lse_out


def _assemble(parts, batch, N, L, S, Bq, dtype, *, sparse: bool, device) -> Tensor:
    """Weights of the steps, dense (*b, L, S) or sparse COO (*b, L, S) of the computed pairs."""
    if not sparse:
        dense = torch.zeros(N, -(-L // Bq) * Bq, S, dtype=parts[0][-1].dtype if parts else dtype, device=device)
        for n0, n1, qblocks, kidx, w in parts:
            qi = (qblocks.view(-1, 1) * Bq + torch.arange(Bq, device=device)).view(1, -1, Bq, 1)  # (1, g, Bq, 1)
            ni = torch.arange(n0, n1, device=device).view(-1, 1, 1, 1)
            kj = kidx.view(1, kidx.shape[0], 1, -1)
            idx = (ni.expand_as(w), qi.expand_as(w), kj.expand_as(w))
            dense = dense.index_put(idx, w, accumulate=True)  # clamped padding keys add exact zeros
        return dense[:, :L].reshape(*batch, L, S).to(dtype)
    idx_list, val_list = [], []
    for n0, n1, qblocks, kidx, w in parts:
        w = w.detach()
        qi = (qblocks.view(-1, 1) * Bq + torch.arange(Bq, device=device)).view(1, -1, Bq, 1)
        ni = torch.arange(n0, n1, device=device).view(-1, 1, 1, 1)
        kj = kidx.view(1, kidx.shape[0], 1, -1)
        keep = (w > 0) & (qi < L)
        nz = keep.nonzero(as_tuple=True)
        idx_list.append(torch.stack([ni.expand_as(w)[nz], qi.expand_as(w)[nz], kj.expand_as(w)[nz]]))
        val_list.append(w[nz])
    if idx_list:
        idx, val = torch.cat(idx_list, 1), torch.cat(val_list)
    else:
        idx, val = torch.zeros(3, 0, dtype=torch.long, device=device), torch.zeros(0, device=device)
    # the flattened batch index back to the batch dims
    coords = []
    rem = idx[0]
    for size in reversed(batch):
        coords.append(rem % size)
        rem = rem // size
    coords = list(reversed(coords))
    full_idx = torch.stack([*coords, idx[1], idx[2]]) if coords else idx[1:]
    return torch.sparse_coo_tensor(full_idx, val.to(dtype), (*batch, L, S)).coalesce()


# ---- the kernel contract (attnkit.kernels._contract) ---------------------------------------------------------

_TILE = 128


def supports(query, key, value, *, score_mod=None, bias=None, **request) -> str | None:
    from attnkit.kernels._contract import softmax_dot_reason

    if bias is not None:
        return "it takes no bias tensor; write the bias as a score_mod (it gets the tile's indices)"
    return softmax_dot_reason(**request)  # a plain dot-product softmax kernel, with the score_mod on top


def suits(query, key, value, *, score_mod=None, mask=None, **_) -> bool:
    """For a score_mod on problems of at least 128 x 128 pairs (below that the plain path is faster)."""
    return score_mod is not None and query.shape[-2] * key.shape[-2] >= 128 * 128


def plan_for(mask, query, key) -> BlockMask:
    from attnkit.masks import Full

    L, S = query.shape[-2], key.shape[-2]
    return (mask if mask is not None else Full()).plan(L, S, _TILE, batch_ndim=max(query.ndim, key.ndim) - 2,
                                                       device=query.device)


def run(query, key, value, *, score, score_mod, mask, scale, return_weights, return_lse=False, **_):
    from attnkit.kernels._contract import dot_scale

    return tiled_attention(query, key, value, plan_for(mask, query, key), scale=dot_scale(query, score, scale),
                           score_mod=score_mod, return_weights=return_weights, return_lse=return_lse)
