"""Sliding-window (truncated) softmax attention: each query block reads a few aligned key blocks, no gather.

Query ``i`` may attend to keys ``j`` with ``i' - left <= j <= i' + right``, ``i' = i + S - L`` (bottom-right
aligned, widths inclusive, as ``attnkit.masks.window``; ``right=0`` is causal-window attention). The queries are
cut into blocks of ``Bq`` rows. Padding the keys in front so that every block's first needed key starts a key
block, block ``b`` needs exactly the ``m = ceil((Bq + left + right) / Bq)`` consecutive key blocks
``b + t0 .. b + t0 + m - 1``; so for each offset ``t`` one batched matmul of *contiguous* views

    S[t] = (scale Q_b) K_{b + t0 + t}^T          for all query blocks b at once       (m, N, blocks, Bq, Bq)

gives every score tile without copying keys. The band's edges are one shared ``(m, Bq, Bq)`` mask; only the
few blocks at the sequence ends get their own mask. Softmax runs over ``(t, column)``; ``O_b = sum_t P[t] V_{b+t0+t}``.
Work and memory are O(L * (Bq + left + right)); nothing is L x S.

Backward (custom autograd) recomputes P = exp(S - lse) from the saved log-sum-exp, block by block:

    dV_{b+t} += P[t]^T dO_b ;  dS[t] = P[t] (dO_b V_{b+t}^T - rowsum(dO * O)) ;  dQ_b = scale sum_t dS[t] K_{b+t}
    dK_{b+t} += dS[t]^T (scale Q_b)

Float32 accumulation for half inputs; rows whose band misses ``[0, S)`` give zero output and zero gradients.
Weights (``return_weights``) are rebuilt from the lse on the same tiles (:func:`blocksparse.weights_from_lse`).

Shape letters: ``*b`` batch dims flattened to N, L queries, S keys, D head dim, Dv value dim, Bq rows per block,
m key blocks per query block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit import masks as _masks
from attnkit.kernels._tiles import mask_on_tiles
from attnkit.kernels.blocksparse import Group, Plan, _check, weights_from_lse

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


_BUDGET = 1 << 24  # score elements per step (m x N x blocks x Bq x Bq)


class _Geometry:
    """Block layout of a window problem (see the module docstring)."""

    def __init__(self, L: int, S: int, left: int, right: int, Bq: int):
        self.L, self.S, self.left, self.right, self.Bq = L, S, left, right, Bq
        self.nbq = -(-L // Bq)
        c = S - L - left  # first key needed by query 0
        self.t0 = -(-max(c, 0) // Bq)  # key block (in padded keys) where query block 0 starts
        self.pad_front = self.t0 * Bq - c  # zeros in front of the keys: >= 0 and aligns every block start
        self.m = -(-(Bq + left + right) // Bq)
        self.nbk = self.nbq + self.t0 + self.m - 1  # key blocks in the padded keys
        self.pad_back = self.nbk * Bq - self.pad_front - S
        if self.pad_back < 0:  # keys beyond every block's reach are cut off
            self.nbk = -(-(self.pad_front + S) // Bq)
            self.pad_back = self.nbk * Bq - self.pad_front - S
        # band in tile coordinates: query row r of a block, key column t*Bq + c of its span (relative key
        # index rel = t*Bq + c - r must lie in [0, left + right])
        r = torch.arange(Bq).view(1, Bq, 1)
        col = (torch.arange(self.m) * Bq).view(self.m, 1, 1) + torch.arange(Bq).view(1, 1, Bq)
        rel = col - r  # (m, Bq, Bq)
        self.band = (rel >= 0) & (rel <= left + right)  # (m, Bq, Bq)
        # blocks touching the sequence ends (keys outside [0, S) or queries >= L) need their own mask
        b = torch.arange(self.nbq)
        first = b * Bq + c  # first key of each block's span (unpadded index)
        last = first + self.m * Bq - 1
        self.edge = torch.nonzero((first < 0) | (last >= S) | ((b + 1) * Bq > L)).flatten()  # (ne,)
        if self.edge.numel():
            kj = first[self.edge].view(-1, 1, 1, 1) + col.unsqueeze(0)  # (ne, m, 1, Bq)
            qi = (self.edge * Bq).view(-1, 1, 1, 1) + r.unsqueeze(0)  # (ne, 1, Bq, 1)
            ok = (kj >= 0) & (kj < S) & (qi < L) & self.band.unsqueeze(0)  # (ne, m, Bq, Bq)
            self.edge_ok = ok.transpose(0, 1)  # (m, ne, Bq, Bq)
        else:
            self.edge_ok = None

    def steps(self, N: int):
        step = max(1, _BUDGET // (self.m * N * self.Bq * self.Bq))
        for b0 in range(0, self.nbq, step):
            yield b0, min(self.nbq, b0 + step)

    def scores(self, qs: Tensor, kp: Tensor, b0: int, b1: int) -> Tensor:
        """Masked scores of query blocks [b0, b1): (m, nc, N, Bq, Bq), -inf outside the band.

        Blocks-first layout: ``qs`` (nbq, N, Bq, D), ``kp`` (nbk, N, Bq, D), so every slice of blocks is one
        contiguous batch for ``bmm`` (no copies).
        """
        nc, N, Bq, D = b1 - b0, qs.shape[1], self.Bq, qs.shape[-1]
        if self.band.device != qs.device:  # built on the CPU; move once
            self.band, self.edge = self.band.to(qs.device), self.edge.to(qs.device)
            self.edge_ok = None if self.edge_ok is None else self.edge_ok.to(qs.device)
        s = qs.new_empty(self.m, nc, N, Bq, Bq)
        qb = qs[b0:b1].view(nc * N, Bq, D)
        for t in range(self.m):
            kb = kp[b0 + self.t0 + t : b1 + self.t0 + t].view(nc * N, Bq, D)  # contiguous key blocks
            torch.bmm(qb, kb.transpose(1, 2), out=s[t].view(nc * N, Bq, Bq))  # S[t] = (scale Q_b) K^T
        if getattr(self, "outside", None) is None or self.outside.device != qs.device or \
                self.outside.dtype != s.dtype:
            # additive 0 / -inf band: a broadcast add is several times faster than a broadcast masked_fill
            self.outside = torch.zeros(self.m, 1, 1, Bq, Bq, dtype=s.dtype, device=s.device).masked_fill_(
                ~self.band.view(self.m, 1, 1, Bq, Bq), float("-inf"))
        s.add_(self.outside)
        if self.edge_ok is not None:
            sel = (self.edge >= b0) & (self.edge < b1)
            if bool(sel.any()):
                local = self.edge[sel] - b0
                s[:, local] = s[:, local].masked_fill(~self.edge_ok[:, sel].unsqueeze(2), float("-inf"))
        return s


def _prep(x: Tensor, N: int, acc: torch.dtype) -> Tensor:
    return x.reshape(N, *x.shape[-2:]).to(acc)


def _blocks(x: Tensor, front: int, back: int, nb: int, Bq: int) -> Tensor:
    """(N, n, d) -> zero-padded, blocks-first (nb, N, Bq, d), contiguous."""
    N, _, d = x.shape
    return F.pad(x, (0, 0, front, back)).view(N, nb, Bq, d).transpose(0, 1).contiguous()


def _unblocks(x: Tensor, start: int, n: int) -> Tensor:
    """(nb, N, Bq, d) -> (N, n, d) rows [start, start + n)."""
    nb, N, Bq, d = x.shape
    return x.transpose(0, 1).reshape(N, nb * Bq, d)[:, start : start + n]


def _window_forward(q: Tensor, k: Tensor, v: Tensor, geo: _Geometry, scale: float):
    N, L, D = q.shape
    Bq, t0 = geo.Bq, geo.t0
    qs = _blocks(q * scale, 0, geo.nbq * Bq - L, geo.nbq, Bq)  # (nbq, N, Bq, D)
    kp = _blocks(k, geo.pad_front, geo.pad_back, geo.nbk, Bq)  # (nbk, N, Bq, D)
    vp = _blocks(v, geo.pad_front, geo.pad_back, geo.nbk, Bq)  # (nbk, N, Bq, Dv)
    Dv = vp.shape[-1]
    out = q.new_empty(geo.nbq, N, Bq, Dv)
    lse = q.new_empty(geo.nbq, N, Bq)
    for b0, b1 in geo.steps(N):
        nc = b1 - b0
        s = geo.scores(qs, kp, b0, b1)  # (m, nc, N, Bq, Bq)
        mx = s.amax(dim=(0, -1))  # (nc, N, Bq)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = s.sub_(mx.unsqueeze(-1)).exp_()  # (m, nc, N, Bq, Bq)
        l = p.sum(dim=(0, -1))  # (nc, N, Bq)
        o = out[b0:b1].view(nc * N, Bq, Dv)
        for t in range(geo.m):  # O_b = sum_t P[t] V_{b+t0+t}
            vb = vp[b0 + t0 + t : b1 + t0 + t].view(nc * N, Bq, Dv)
            if t == 0:
                torch.bmm(p[t].view(nc * N, Bq, Bq), vb, out=o)
            else:
                o.baddbmm_(p[t].view(nc * N, Bq, Bq), vb)
        out[b0:b1].div_(torch.where(l > 0, l, torch.ones_like(l)).unsqueeze(-1))
        lse[b0:b1] = torch.where(l > 0, mx + torch.log(l), torch.full_like(l, float("-inf")))
    return _unblocks(out, 0, L), _unblocks(lse.unsqueeze(-1), 0, L).squeeze(-1)


def _window_backward(q, k, v, out, lse, dout, geo: _Geometry, scale: float):
    N, L, D = q.shape
    S, Bq, t0 = k.shape[1], geo.Bq, geo.t0
    pad_q = geo.nbq * Bq - L
    qs = _blocks(q * scale, 0, pad_q, geo.nbq, Bq)  # (nbq, N, Bq, D)
    kp = _blocks(k, geo.pad_front, geo.pad_back, geo.nbk, Bq)  # (nbk, N, Bq, D)
    vp = _blocks(v, geo.pad_front, geo.pad_back, geo.nbk, Bq)  # (nbk, N, Bq, Dv)
    dop = _blocks(dout, 0, pad_q, geo.nbq, Bq)  # (nbq, N, Bq, Dv)
    Dv = vp.shape[-1]
    # delta_i = sum_d dO_id O_id
    delta = _blocks((dout * out).sum(-1, keepdim=True), 0, pad_q, geo.nbq, Bq)  # (nbq, N, Bq, 1)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # empty rows: P = 0
    lse_p = _blocks(lse.unsqueeze(-1), 0, pad_q, geo.nbq, Bq)  # (nbq, N, Bq, 1); padded rows 0: s = -inf
    dq = torch.empty_like(qs)
    dkp = torch.zeros_like(kp)
    dvp = torch.zeros_like(vp)
    for b0, b1 in geo.steps(N):
        nc = b1 - b0
        s = geo.scores(qs, kp, b0, b1)
        p = s.sub_(lse_p[b0:b1]).exp_()  # P = exp(S - lse)  (m, nc, N, Bq, Bq)
        dob = dop[b0:b1].view(nc * N, Bq, Dv)
        qb = qs[b0:b1].view(nc * N, Bq, D)
        dqb = dq[b0:b1].view(nc * N, Bq, D)
        dlt = delta[b0:b1].view(nc * N, Bq, 1)
        for t in range(geo.m):
            sl = slice(b0 + t0 + t, b1 + t0 + t)
            pt = p[t].view(nc * N, Bq, Bq)
            # dV_{b+t} += P[t]^T dO_b
            dvp[sl].view(nc * N, Bq, Dv).baddbmm_(pt.transpose(1, 2), dob)
            # dS[t] = P[t] * (dO_b V^T - delta)
            ds = torch.bmm(dob, vp[sl].view(nc * N, Bq, Dv).transpose(1, 2)).sub_(dlt).mul_(pt)
            if t == 0:
                torch.bmm(ds, kp[sl].view(nc * N, Bq, D), out=dqb)  # dQ_b = sum_t dS[t] K (x scale below)
            else:
                dqb.baddbmm_(ds, kp[sl].view(nc * N, Bq, D))
            dkp[sl].view(nc * N, Bq, D).baddbmm_(ds.transpose(1, 2), qb)  # dK += dS^T (scale Q)
    dq = _unblocks(dq, 0, L).mul_(scale)
    return dq, _unblocks(dkp, geo.pad_front, S), _unblocks(dvp, geo.pad_front, S)


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, geo: _Geometry, scale: float):
        out, lse = _window_forward(q, k, v, geo, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geo, ctx.scale = geo, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _window_backward(q, k, v, out, lse, dout.to(q.dtype), ctx.geo, ctx.scale)
        return dq, dk, dv, None, None


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
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    q = query.expand(*batch, L, query.shape[-1])
    k = key.expand(*batch, S, key.shape[-1])
    v = value.expand(*batch, S, value.shape[-1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    N = math.prod(batch)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    geo = _Geometry(L, S, left, right, block)
    out, lse = _WindowAttention.apply(_prep(q, N, acc), _prep(k, N, acc), _prep(v, N, acc), geo, float(scale))
    out = out.reshape(*batch, L, v.shape[-1]).to(query.dtype)  # (*b, L, Dv)
    if not return_weights:
        return out
    plan = window_plan(L, S, left, right, block=block, device=query.device, batch_ndim=len(batch))
    weights = weights_from_lse(q, k, lse.reshape(*batch, L), plan, float(scale))
    return out, weights.to(query.dtype)
