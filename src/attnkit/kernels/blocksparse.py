"""Block-sparse softmax attention: compute scores only on the (query block, key set) tiles a mask needs.

The queries are cut into blocks of ``block`` rows. Each query block ``b`` gets a list of key indices
``kidx[b]`` (the keys of its non-empty tiles, or for a window one contiguous slice); blocks with the same
number of keys form a *group* and are computed together with batched matmuls:

    S_b = scale * Q_b K[kidx_b]^T  (masked with the mask's own rule)     (block_rows, Kw)
    lse_b = log sum_j exp(S_b)  ;  O_b = exp(S_b - lse_b) V[kidx_b]

Work and memory are O(number of covered pairs); no (L, S) tensor is built (unless the caller asks for dense
weights). Backward (custom autograd) recomputes P = exp(S - lse) tile by tile from the saved log-sum-exp, as
FlashAttention does, and saves only q, k, v, out, lse and the per-tile boolean mask:

    dV[kidx] += P^T dO ;  dS = P * (dO V^T - rowsum(dO * O)) ;  dQ = scale dS K ;  dK[kidx] += scale dS^T Q

A query row with no allowed key gets zero output, zero weights and finite (zero) gradients.

Shape letters: ``*b`` batch dims (e.g. B, H), L queries, S keys, D head dim, Dv value dim, Bq rows per
block, Kw keys per block of a group, G blocks in a group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit import masks as _masks
from attnkit.kernels._tiles import mask_on_tiles

__all__ = ["blocksparse_attention", "Plan", "plan_from_mask", "run_plan"]

_BUDGET = 1 << 22  # score elements per step (x batch): bounds the working memory of one step


@dataclass
class Group:
    """Query blocks that share a key count: ``qblocks`` (G,), key indices ``kidx`` (G, Kw) (clamped into
    [0, S)), and ``allowed`` (*mb, G, Bq, Kw) bool, False on padding, so clamped duplicates weigh nothing."""

    qblocks: Tensor
    kidx: Tensor
    allowed: Tensor


@dataclass
class Plan:
    """Where a block-sparse kernel computes: query length L, key length S, block rows, and the groups."""

    L: int
    S: int
    block: int
    groups: list[Group]

    @property
    def pairs(self) -> int:
        """Number of (query, key) pairs the kernel computes scores for (per batch element and head)."""
        return sum(g.kidx.numel() * self.block for g in self.groups)


def plan_from_mask(mask: _masks.Mask, L: int, S: int, *, block: int = 128, batch_ndim: int = 2,
                   device=None) -> Plan:
    """Plan from ``mask.block_mask(L, S, block)``: each query block visits the key tiles that hold a True."""
    tiles = cached_block_mask(mask, L, S, block, device)  # (nbq, nbk)
    nbq, nbk = tiles.shape
    counts = tiles.sum(1)  # (nbq,)
    groups = []
    rows = torch.arange(block, device=device)
    for c in sorted(set(counts.tolist()) - {0}):
        qblocks = torch.nonzero(counts == c).flatten()  # (G,)
        kblocks = torch.nonzero(tiles[qblocks])[:, 1].view(-1, c)  # (G, c): the non-empty key tiles
        kidx = (kblocks.unsqueeze(-1) * block + rows).flatten(1)  # (G, c*block)
        qi = qblocks.unsqueeze(-1) * block + rows  # (G, block)
        allowed = mask_on_tiles(mask, qi, kidx, L, S, batch_ndim)  # (*mb, G, block, Kw)
        groups.append(Group(qblocks, kidx.clamp(0, max(S - 1, 0)), allowed))
    return Plan(L, S, block, groups)


def cached_block_mask(mask: _masks.Mask, L: int, S: int, block: int, device=None) -> Tensor:
    """``mask.block_mask(L, S, block)`` as bool, remembered on the mask object for the last (L, S, block).

    Dispatch (to measure the density) and the kernel (to plan) both need it; for a dense mask it is a full
    pass over L x S, so it is computed once per mask and shape.
    """
    key = (L, S, block, str(device), _versions(mask))  # in-place edits of a mask's tensors invalidate it
    hit = getattr(mask, "_attnkit_tiles", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    tiles = mask.block_mask(L, S, block, device=device).to(torch.bool)
    try:
        mask._attnkit_tiles = (key, tiles)
    except AttributeError:  # a mask class with __slots__: no cache
        pass
    return tiles


def _versions(mask: _masks.Mask) -> tuple:
    if isinstance(mask, (_masks.And, _masks.Or)):
        return (_versions(mask.a), _versions(mask.b))
    t = getattr(mask, "tensor", None)
    if t is None:
        t = getattr(mask, "lengths", None)
    if t is None:
        t = getattr(mask, "edge_index", None)
    return (id(t), t._version) if isinstance(t, Tensor) else ()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(q: Tensor, k: Tensor, v: Tensor, plan: Plan, scale: float) -> tuple[Tensor, Tensor]:
    *batch, L, D = q.shape
    Bq = plan.block
    nbq = -(-L // Bq)
    Dv = v.shape[-1]
    qp = F.pad(q, (0, 0, 0, nbq * Bq - L)).view(*batch, nbq, Bq, D)  # (*b, nbq, Bq, D)
    out = q.new_zeros(*batch, nbq, Bq, Dv)  # (*b, nbq, Bq, Dv)
    lse = q.new_full((*batch, nbq, Bq), float("-inf"))  # (*b, nbq, Bq)
    nb = math.prod(batch)
    for grp in plan.groups:
        G, Kw = grp.kidx.shape
        step = max(1, _BUDGET // max(1, nb * Bq * Kw))
        for a in range(0, G, step):
            sl = slice(a, a + step)
            blocks, kidx, allowed = grp.qblocks[sl], grp.kidx[sl], grp.allowed[..., sl, :, :]
            g = blocks.shape[0]
            qb = qp.index_select(-3, blocks)  # (*b, g, Bq, D)
            kb = k.index_select(-2, kidx.flatten()).unflatten(-2, (g, Kw))  # (*b, g, Kw, D)
            vb = v.index_select(-2, kidx.flatten()).unflatten(-2, (g, Kw))  # (*b, g, Kw, Dv)
            # S = scale * Q K^T, -inf where the mask forbids
            s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale).masked_fill_(~allowed, float("-inf"))
            m = s.amax(-1, keepdim=True)  # (*b, g, Bq, 1)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = s.sub_(m).exp_()  # (*b, g, Bq, Kw)
            l = p.sum(-1, keepdim=True)  # (*b, g, Bq, 1)
            o = torch.matmul(p, vb).div_(torch.where(l > 0, l, torch.ones_like(l)))  # (*b, g, Bq, Dv)
            out.index_copy_(-3, blocks, o)
            lse.index_copy_(-2, blocks, (m + torch.log(l)).squeeze(-1))
    out = out.flatten(-3, -2)[..., :L, :]  # (*b, L, Dv)
    lse = lse.flatten(-2, -1)[..., :L]  # (*b, L)
    return out, lse


def _backward(q, k, v, out, lse, dout, plan: Plan, scale: float):
    *batch, L, D = q.shape
    Bq = plan.block
    nbq = -(-L // Bq)
    pad = nbq * Bq - L
    qp = F.pad(q, (0, 0, 0, pad)).view(*batch, nbq, Bq, D)  # (*b, nbq, Bq, D)
    dop = F.pad(dout, (0, 0, 0, pad)).view(*batch, nbq, Bq, dout.shape[-1])  # (*b, nbq, Bq, Dv)
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij
    delta = F.pad((dout * out).sum(-1), (0, pad)).view(*batch, nbq, Bq, 1)  # (*b, nbq, Bq, 1)
    lse_p = F.pad(lse, (0, pad), value=float("-inf"))
    lse_p = torch.where(torch.isfinite(lse_p), lse_p, torch.full_like(lse_p, float("inf")))
    lse_p = lse_p.view(*batch, nbq, Bq, 1)  # (*b, nbq, Bq, 1); +inf on empty rows makes P = 0
    dq = torch.zeros_like(qp)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    nb = math.prod(batch)
    for grp in plan.groups:
        G, Kw = grp.kidx.shape
        step = max(1, _BUDGET // max(1, nb * Bq * Kw))
        for a in range(0, G, step):
            sl = slice(a, a + step)
            blocks, kidx, allowed = grp.qblocks[sl], grp.kidx[sl], grp.allowed[..., sl, :, :]
            g = blocks.shape[0]
            flat = kidx.flatten()
            qb = qp.index_select(-3, blocks)  # (*b, g, Bq, D)
            kb = k.index_select(-2, flat).unflatten(-2, (g, Kw))  # (*b, g, Kw, D)
            vb = v.index_select(-2, flat).unflatten(-2, (g, Kw))  # (*b, g, Kw, Dv)
            dob = dop.index_select(-3, blocks)  # (*b, g, Bq, Dv)
            # P = exp(S - lse), recomputed
            s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale).masked_fill_(~allowed, float("-inf"))
            p = s.sub_(lse_p.index_select(-3, blocks)).exp_()  # (*b, g, Bq, Kw)
            # dV[kidx] += P^T dO
            dv.index_add_(-2, flat, torch.matmul(p.transpose(-1, -2), dob).flatten(-3, -2))
            # dS = P * (dO V^T - delta)
            ds = torch.matmul(dob, vb.transpose(-1, -2)).sub_(delta.index_select(-3, blocks)).mul_(p)
            ds.mul_(scale)
            dq.index_copy_(-3, blocks, torch.matmul(ds, kb))  # each query block lives in one group
            dk.index_add_(-2, flat, torch.matmul(ds.transpose(-1, -2), qb).flatten(-3, -2))
    return dq.flatten(-3, -2)[..., :L, :], dk, dv


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: Plan, scale: float):
        acc = _acc_dtype(q.dtype)
        qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
        out, lse = _forward(qa, ka, va, plan, scale)
        ctx.save_for_backward(qa, ka, va, out, lse)
        ctx.plan, ctx.scale, ctx.dtype = plan, scale, q.dtype
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout.to(q.dtype), ctx.plan, ctx.scale)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None


def _prepare(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Broadcast the batch dims of q, k, v to one shape (keys/values are expanded, not copied)."""
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    q = query.expand(*batch, *query.shape[-2:])
    k = key.expand(*batch, *key.shape[-2:])
    v = value.expand(*batch, *value.shape[-2:])
    return q, k, v


def run_plan(query: Tensor, key: Tensor, value: Tensor, plan: Plan, *, scale: float | None = None,
             return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Run softmax attention on the tiles of ``plan`` (see the module docstring).

    Returns ``out`` (*b, L, Dv), or ``(out, weights)`` with dense weights (*b, L, S) rebuilt from the
    log-sum-exp (zeros outside the tiles).
    """
    q, k, v = _prepare(query, key, value)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    out, lse = _BlockSparse.apply(q, k, v, plan, float(scale))
    if not return_weights:
        return out
    return out, weights_from_lse(q, k, lse, plan, float(scale)).to(q.dtype)


def weights_from_lse(q: Tensor, k: Tensor, lse: Tensor, plan: Plan, scale: float,
                     rows: Tensor | None = None) -> Tensor:
    """Attention weights exp(S - lse) on the plan's tiles, scattered into a dense (*b, L, S) tensor.

    With ``rows`` (1-D query indices) only those rows are returned: (*b, len(rows), S).
    Gradients flow to ``q`` and ``k`` (each row is renormalized over its tiles, so they are exact).
    """
    *batch, L, D = q.shape
    S, Bq = k.shape[-2], plan.block
    nbq = -(-L // Bq)
    acc = _acc_dtype(q.dtype)
    qp = F.pad(q.to(acc), (0, 0, 0, nbq * Bq - L)).view(*batch, nbq, Bq, D)
    lse_p = F.pad(lse, (0, nbq * Bq - L), value=float("-inf"))
    lse_p = torch.where(torch.isfinite(lse_p), lse_p, torch.full_like(lse_p, float("inf")))
    lse_p = lse_p.view(*batch, nbq, Bq, 1)
    want = None
    if rows is not None:
        want = torch.zeros(nbq * Bq, dtype=torch.bool, device=q.device)
        want[rows] = True
        want = want.view(nbq, Bq).any(1)  # (nbq,): blocks holding a wanted row
    parts = []
    for grp in plan.groups:
        G, Kw = grp.kidx.shape
        sel = torch.arange(G, device=q.device) if want is None else torch.nonzero(want[grp.qblocks]).flatten()
        if sel.numel() == 0:
            continue
        blocks, kidx = grp.qblocks[sel], grp.kidx[sel]
        allowed = grp.allowed.index_select(-3, sel)
        qb = qp.index_select(-3, blocks)  # (*b, g, Bq, D)
        kb = k.to(acc).index_select(-2, kidx.flatten()).unflatten(-2, (blocks.shape[0], Kw))  # (*b, g, Kw, D)
        s = (qb @ kb.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        e = torch.exp(s - lse_p.index_select(-3, blocks))  # (*b, g, Bq, Kw)
        # every allowed key of a row lies in its block's tiles, so this sum is 1 up to rounding; dividing by
        # it makes the weights' gradient exact (the saved lse is a constant to autograd)
        tot = e.sum(-1, keepdim=True)
        w = e / torch.where(tot > 0, tot, torch.ones_like(tot))
        dense = w.new_zeros(*w.shape[:-1], S).scatter_add(
            -1, kidx.unsqueeze(-2).expand(*w.shape), w
        )  # (*b, g, Bq, S); clamped padding keys add exact zeros
        parts.append((blocks, dense))
    full = q.new_zeros(*batch, nbq, Bq, S, dtype=acc)
    for blocks, dense in parts:
        full = full.index_copy(-3, blocks, dense)
    full = full.flatten(-3, -2)[..., :L, :]  # (*b, L, S)
    return full if rows is None else full.index_select(-2, rows)


def blocksparse_attention(query: Tensor, key: Tensor, value: Tensor, mask: _masks.Mask | Tensor, *,
                          scale: float | None = None, block: int = 128,
                          return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product softmax attention that computes only the tiles where ``mask`` holds a True.

    ``out_i = sum_j softmax_j(scale q_i . k_j | mask_ij) v_j``; empty rows give zeros.

    Args:
        query, key, value: floating tensors; batch dims broadcast.
        mask: an attnkit mask (or boolean tensor) with True = may attend; its ``block_mask`` picks the tiles.
        scale: score multiplier, default ``1/sqrt(D)``.
        block: tile size (query rows and key columns).
        return_weights: also return dense weights (*b, L, S), rebuilt from the saved log-sum-exp.

    Shape:
        query (*b, L, D), key (*b, S, D), value (*b, S, Dv) -> out (*b, L, Dv) [, weights (*b, L, S)].

    Raises:
        TypeError/ValueError on non-float or mismatched inputs, or a bad ``block``.
    """
    _check(query, key, value)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int; got {block!r}.")
    mask = _masks.as_mask(mask)
    L, S = query.shape[-2], key.shape[-2]
    batch_ndim = max(query.ndim, key.ndim) - 2
    plan = plan_from_mask(mask, L, S, block=block, batch_ndim=batch_ndim, device=query.device)
    return run_plan(query, key, value, plan, scale=scale, return_weights=return_weights)


def _check(query: Tensor, key: Tensor, value: Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}.")
        if t.ndim < 2:
            raise ValueError(f"{name} must have shape (..., length, dim); got {tuple(t.shape)}.")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key, value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must share the last dim D; got {query.shape[-1]} and {key.shape[-1]}.")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must share the length S; got {key.shape[-2]} and {value.shape[-2]}.")
