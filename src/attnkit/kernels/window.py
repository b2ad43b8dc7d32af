"""Sliding-window (truncated) softmax attention: each query block reads one strided span of keys, no gather.

Query ``i`` may attend to keys ``j`` with ``i' - left <= j <= i' + right``, ``i' = i + S - L`` (bottom-right
aligned, widths inclusive, as ``attnkit.masks.window``; ``right=0`` is causal-window attention). The queries are
cut into blocks of ``Bq`` rows; block ``b`` needs the ``Kw = m * Bq >= Bq + left + right`` keys from
``b * Bq + c`` on (``c = S - L - left``). These spans overlap with a fixed stride, so for a run of blocks they
are one ``as_strided`` view of the keys (no copy), and one batched matmul per step gives every score tile:

    S_b = scale Q_b K_{span b}^T                          (tiles, Bq, Kw)
    P_b = softmax(S_b masked to the band)   ;   O_b = P_b V_{span b}

The band (row ``r`` of a tile keeps columns ``r .. r + left + right``) is one shared ``(Bq, Kw)`` mask touching
only the first and last column ranges; the fused ``torch.softmax`` does max, exp, sum and normalisation in one
pass over a tile that is still in cache. Only the few blocks at the sequence ends (keys outside ``[0, S)`` or a
partial query block) are copied with zero padding and masked in full. Work and memory are
O(L * (Bq + left + right)); nothing is L x S.

Masked scores: a 0 / -inf bias is added when every score is provably finite (``D max|q| max|k| scale``
bounded); otherwise (inf or NaN in q or k) ``where`` is used, so a non-finite key reaches only the rows that
may attend to it. A row with no allowed key gives zero output and zero gradients.

Backward (custom autograd) recomputes P with the same steps (nothing of size L x window is saved):

    dP = dO V_{span}^T ;  dS = P (dP - rowsum(dO * O)) ;  dQ_b = scale dS K_{span} ;
    dK_{span} += scale dS^T Q_b ;  dV_{span} += P^T dO_b       (spans accumulated by Bq-row sub-block)

Float32 accumulation for half inputs. Weights (``return_weights``) are rebuilt from the log-sum-exp on the same
tiles (:func:`blocksparse.weights_from_lse`).

Shape letters: ``*b`` batch dims flattened to N, L queries, S keys, D head dim, Dv value dim, Bq rows per block,
Kw keys per tile, m = Kw / Bq key sub-blocks per tile, nt tiles per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit import masks as _masks
from attnkit.kernels._contract import check_qkv as _check
from attnkit.kernels._contract import dot_scale, softmax_dot_reason
from attnkit.kernels.blocksparse import weights_from_lse
from attnkit.masks import BlockMask, Group, allowed_on

__all__ = ["window_attention", "window_plan"]


def window_plan(L: int, S: int, left: int, right: int, *, block: int = 64, device=None,
                extra: _masks.Mask | None = None, batch_ndim: int = 2) -> BlockMask:
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
    allowed = allowed_on(mask, qi, kj, L, S, batch_ndim)  # (*mb, nbq, Bq, Kw)
    # blocks whose whole slice lies outside [0, S) (possible when L > S) compute nothing: drop them
    live = ((kj >= 0) & (kj < S)).any(-1)  # (nbq,)
    if not bool(live.all()):
        keep = torch.nonzero(live).flatten()
        return BlockMask(L, S, block, [Group(keep, kj[keep].clamp(0, max(S - 1, 0)),
                                             allowed.index_select(-3, keep))] if keep.numel() else [], mask=mask)
    return BlockMask(L, S, block, [Group(torch.arange(nbq, device=device), kj.clamp(0, max(S - 1, 0)), allowed)],
                     mask=mask)


_BUDGET = 1 << 19  # score elements per step (tiles x Bq x Kw): a few MB, so the passes over a step hit the cache
_SAVE_P_BYTES = 1 << 26  # training keeps P (N x L x Kw) for the backward up to this size, else recomputes it
# (64 MiB. Each step's P is fresh memory, and its page faults cost about what recomputing saves: H=8, window
# 128, fwd+bwd interleaved, keeping P was 3 % faster at L=4096 (42 MB), equal within 3 % at L=16384 (168 MB) and
# slower at L=65536 (671 MB). Recomputing from L=16384 up also keeps the time per row the same at every length.)


class _Geometry:
    """Tile layout of a window problem with ``N`` heads (see the module docstring).

    Query block ``b`` reads the ``Kw = m * Bq`` keys from ``b * Bq + c`` on (``c = S - L - left``). Interior
    blocks (whole query block, key span inside ``[0, S)``) read strided views of the keys themselves; the few
    blocks at the ends form *padded* regions whose spans are copied with zero padding and masked in full.
    """

    def __init__(self, L: int, S: int, left: int, right: int, Bq: int, device=None):
        self.L, self.S, self.Bq = L, S, Bq
        self.nbq = -(-L // Bq)
        self.c = S - L - left  # key under column 0 of query block 0
        self.m = -(-(Bq + left + right) // Bq)  # key sub-blocks of Bq per tile
        self.Kw = self.m * Bq
        r = torch.arange(Bq, device=device).view(Bq, 1)
        col = torch.arange(self.Kw, device=device).view(1, self.Kw)
        rel = col - r  # (Bq, Kw): key offset from the row's first allowed key
        self.band = (rel >= 0) & (rel <= left + right)  # (Bq, Kw)
        # columns outside the band for some row: [0, a) and [z, Kw); the columns between are inside for all rows
        inside = self.band.all(0).tolist()
        a = inside.index(True) if True in inside else self.Kw
        z = self.Kw - inside[::-1].index(True) if True in inside else self.Kw
        self.cuts = [(u, w) for u, w in ((0, a), (z, self.Kw)) if w > u]
        # interior blocks: span inside [0, S) and all Bq query rows < L
        lo = max(0, -(self.c // Bq))
        hi = min((S - self.c - self.Kw) // Bq + 1, L // Bq)
        if lo < hi:
            self.interior = (lo, hi)
            self.padded = [(u, w) for u, w in ((0, lo), (hi, self.nbq)) if w > u]
        else:
            self.interior = None
            self.padded = [(0, self.nbq)] if self.nbq else []
        self._consts: dict = {}

    def tiles_per_step(self) -> int:
        return max(1, _BUDGET // (self.Bq * self.Kw))

    def allowed(self, b0: int, b1: int) -> Tensor:
        """Full "may attend" of query blocks [b0, b1): band, keys inside [0, S), queries < L. (nb, Bq, Kw)"""
        dev = self.band.device
        b = torch.arange(b0, b1, device=dev).view(-1, 1, 1)
        kj = b * self.Bq + self.c + torch.arange(self.Kw, device=dev).view(1, 1, -1)  # (nb, 1, Kw)
        qi = b * self.Bq + torch.arange(self.Bq, device=dev).view(1, -1, 1)  # (nb, Bq, 1)
        return self.band & (kj >= 0) & (kj < self.S) & (qi < self.L)

    def _const(self, like: Tensor):
        key = (like.dtype, like.device)
        if key not in self._consts:
            band = self.band.to(like.device)
            self._consts[key] = (
                [(u, w, band[:, u:w], torch.zeros(self.Bq, w - u, dtype=like.dtype, device=like.device)
                  .masked_fill_(~band[:, u:w], float("-inf"))) for u, w in self.cuts],
                torch.tensor(float("-inf"), dtype=like.dtype, device=like.device),
                torch.tensor(0.0, dtype=like.dtype, device=like.device),
            )
        return self._consts[key]

    def mask(self, s: Tensor, ok: Tensor | None, exact: bool) -> None:
        """Scores outside the allowed set -> -inf, in place. ``s`` (nt, Bq, Kw); ``ok`` (nt, Bq, Kw) or None.

        Interior tiles add a 0 / -inf bias on the two edge column ranges (several times faster than ``where``);
        that is exact only when no score is +-inf or NaN, so ``exact=True`` (scores may not be finite) selects
        ``where``, which never lets a masked score reach the softmax.
        """
        cuts, ninf, _ = self._const(s)
        if ok is not None:
            torch.where(ok, s, ninf, out=s)
            return
        for u, w, band, bias in cuts:
            if exact:
                torch.where(band, s[..., u:w], ninf, out=s[..., u:w])
            else:
                s[..., u:w].add_(bias)

    def clear(self, p: Tensor, ok: Tensor | None, exact: bool) -> None:
        """Exact zeros at every masked position (also rows with no allowed key, whose softmax is NaN)."""
        cuts, _, zero = self._const(p)
        if ok is not None:
            torch.where(ok, p, zero, out=p)
        elif exact:
            for u, w, band, _ in cuts:
                torch.where(band, p[..., u:w], zero, out=p[..., u:w])


def _span(x: Tensor, first: int, n: int, Bq: int, Kw: int) -> Tensor:
    """Overlapping key spans of ``n`` blocks of a (rows, d) tensor: span i = rows first + i*Bq .. + Kw. (n, Kw, d)"""
    d = x.shape[-1]
    return x.as_strided((n, Kw, d), (Bq * d, d, 1), x.storage_offset() + first * d)


def _padded_tiles(q: Tensor, k: Tensor, v: Tensor, geo: _Geometry, b0: int, b1: int):
    """Query tiles and zero-padded key/value spans of blocks [b0, b1) of every head.

    Returns qt (N*nb, Bq, D), kt (N*nb, Kw, D), vt (N*nb, Kw, Dv), the key range [k0, k1) they hold, and the
    padded key buffers' first key ``kfirst``.
    """
    N, L, D = q.shape
    S, Bq, Kw, m = k.shape[1], geo.Bq, geo.Kw, geo.m
    nb = b1 - b0
    qt = q.new_zeros(N, nb * Bq, D)
    qt[:, : min(L, b1 * Bq) - b0 * Bq] = q[:, b0 * Bq : b1 * Bq]
    kfirst = b0 * Bq + geo.c  # key under the first padded row
    rows = (nb + m - 1) * Bq
    k0, k1 = max(0, kfirst), min(S, kfirst + rows)
    kp = k.new_zeros(N, rows, D)
    vp = v.new_zeros(N, rows, v.shape[-1])
    if k1 > k0:
        kp[:, k0 - kfirst : k1 - kfirst] = k[:, k0:k1]
        vp[:, k0 - kfirst : k1 - kfirst] = v[:, k0:k1]

    def spans(x):  # (N, rows, d) -> (N*nb, Kw, d)
        d = x.shape[-1]
        return x.as_strided((N, nb, Kw, d), (rows * d, Bq * d, d, 1)).reshape(N * nb, Kw, d)

    return qt.view(N * nb, Bq, D), spans(kp), spans(vp), (k0, k1), kfirst


def _fold(t: Tensor, N: int, nb: int, geo: _Geometry) -> Tensor:
    """Sum overlapping span gradients (N*nb, Kw, d) into padded key rows (N, (nb + m - 1) * Bq, d)."""
    d, Bq, m = t.shape[-1], geo.Bq, geo.m
    acc = t.new_zeros(N, nb + m - 1, Bq, d)
    parts = t.view(N, nb, m, Bq, d)
    for j in range(m):
        acc[:, j : j + nb] += parts[:, :, j]
    return acc.view(N, (nb + m - 1) * Bq, d)


def _ranges(n: int, step: int):
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _window_forward(q: Tensor, k: Tensor, v: Tensor, geo: _Geometry, scale: float, exact: bool, want_lse: bool,
                    save_p: bool):
    """out (N, L, Dv); the log-sum-exp (N, L) if ``want_lse`` (else None); P if ``save_p`` (else None).

    The saved P is ``(interior (N, nb, Bq, Kw) or None, [padded region (N * nb, Bq, Kw), ...])``.
    """
    N, L, D = q.shape
    Bq, Kw, Dv = geo.Bq, geo.Kw, v.shape[-1]
    step = geo.tiles_per_step()
    lpad = geo.nbq * Bq
    out = q.new_empty(N, lpad, Dv)
    lse = q.new_empty(N, lpad) if want_lse else None
    scratch = q.new_empty(step, Bq, Kw)
    p_int = q.new_empty(N, geo.interior[1] - geo.interior[0], Bq, Kw) if save_p and geo.interior else None
    p_pad = []

    def tile(qb, kb, vb, ob, ok, lb, s=None):  # one step: S = scale Q K^T -> P = softmax -> O = P V
        s = scratch[: qb.shape[0]] if s is None else s
        s.baddbmm_(qb, kb.transpose(1, 2), beta=0, alpha=scale)  # (nt, Bq, Kw)
        geo.mask(s, ok, exact)
        mx = s.amax(-1) if lb is not None else None  # (nt, Bq)
        torch.softmax(s, -1, out=s)  # P
        geo.clear(s, ok, exact)
        if lb is not None:  # lse = max + log sum exp(S - max) = max - log(max P)
            pm = s.amax(-1)
            lb.copy_(torch.where(pm > 0, mx - torch.log(pm), torch.full_like(pm, float("-inf"))))
        torch.bmm(s, vb, out=ob)

    if geo.interior is not None:
        lo, hi = geo.interior
        for n in range(N):
            for b0, b1 in _ranges(hi - lo, step):
                b0, b1 = b0 + lo, b1 + lo
                nt = b1 - b0
                tile(q[n, b0 * Bq : b1 * Bq].view(nt, Bq, D), _span(k[n], b0 * Bq + geo.c, nt, Bq, Kw),
                     _span(v[n], b0 * Bq + geo.c, nt, Bq, Kw), out[n, b0 * Bq : b1 * Bq].view(nt, Bq, Dv), None,
                     None if lse is None else lse[n, b0 * Bq : b1 * Bq].view(nt, Bq),
                     None if p_int is None else p_int[n, b0 - lo : b1 - lo])
    for r0, r1 in geo.padded:
        nb = r1 - r0
        qt, kt, vt, _, _ = _padded_tiles(q, k, v, geo, r0, r1)
        ok = geo.allowed(r0, r1)  # (nb, Bq, Kw)
        ot = q.new_empty(N * nb, Bq, Dv)
        lt = q.new_empty(N * nb, Bq) if want_lse else None
        pt = q.new_empty(N * nb, Bq, Kw) if save_p else None
        p_pad.append(pt)
        for i0, i1 in _ranges(N * nb, step):
            okb = ok[torch.arange(i0, i1, device=ok.device) % nb]
            tile(qt[i0:i1], kt[i0:i1], vt[i0:i1], ot[i0:i1], okb, None if lt is None else lt[i0:i1],
                 None if pt is None else pt[i0:i1])
        out[:, r0 * Bq : r1 * Bq] = ot.view(N, nb * Bq, Dv)
        if lse is not None:
            lse[:, r0 * Bq : r1 * Bq] = lt.view(N, nb * Bq)
    if lpad != L:
        out = out[:, :L].contiguous()
        lse = None if lse is None else lse[:, :L].contiguous()
    return out, lse, ((p_int, p_pad) if save_p else None)


def _window_backward(q, k, v, out, dout, geo: _Geometry, scale: float, exact: bool, saved_p=None):
    """dq, dk, dv. Uses the forward's P (``saved_p``) or recomputes it with the forward's own steps:

    dP = dO V^T ;  dS = P (dP - rowsum(dO * O)) ;  dQ = scale dS K ;  dK += scale dS^T Q ;  dV += P^T dO
    """
    N, L, D = q.shape
    Bq, Kw, m, Dv = geo.Bq, geo.Kw, geo.m, v.shape[-1]
    step = geo.tiles_per_step()
    delta = (dout * out).sum(-1)  # (N, L): rowsum(dO * O)
    # a non-finite dO or O would turn the exact zeros of masked P into NaN in dS: clear them with where
    exact_fwd, exact = exact, exact or not bool(torch.isfinite(delta).all())
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    s_buf = q.new_empty(step, Bq, Kw)
    ds_buf = q.new_empty(step, Bq, Kw)

    p_int, p_pad = saved_p if saved_p is not None else (None, [None] * len(geo.padded))

    def tile(qb, kb, vb, dob, dlt, ok, p=None):  # -> P, dS (nt, Bq, Kw); writes nothing else
        nt = qb.shape[0]
        ds = ds_buf[:nt]
        if p is None:  # recompute P exactly as the forward did
            p = s_buf[:nt]
            p.baddbmm_(qb, kb.transpose(1, 2), beta=0, alpha=scale)
            geo.mask(p, ok, exact_fwd)
            torch.softmax(p, -1, out=p)
            geo.clear(p, ok, exact_fwd)
        torch.bmm(dob, vb.transpose(1, 2), out=ds)  # dP = dO V^T
        ds.sub_(dlt).mul_(p)  # dS = P (dP - delta)
        geo.clear(ds, ok, exact)
        return p, ds

    if geo.interior is not None:
        lo, hi = geo.interior
        for n in range(N):
            for b0, b1 in _ranges(hi - lo, step):
                b0, b1 = b0 + lo, b1 + lo
                nt, rows, kf = b1 - b0, slice(b0 * Bq, b1 * Bq), b0 * Bq + geo.c
                qb = q[n, rows].view(nt, Bq, D)
                dob = dout[n, rows].view(nt, Bq, Dv)
                kb = _span(k[n], kf, nt, Bq, Kw)
                p, ds = tile(qb, kb, _span(v[n], kf, nt, Bq, Kw), dob, delta[n, rows].view(nt, Bq, 1), None,
                             None if p_int is None else p_int[n, b0 - lo : b1 - lo])
                dq[n, rows].view(nt, Bq, D).baddbmm_(ds, kb, beta=0, alpha=scale)  # dQ = scale dS K
                for j in range(m):  # key sub-block j of every tile: distinct rows within one call
                    kr = slice(kf + j * Bq, kf + (j + nt) * Bq)
                    cols = slice(j * Bq, (j + 1) * Bq)
                    dv[n, kr].view(nt, Bq, Dv).baddbmm_(p[:, :, cols].transpose(1, 2), dob)  # dV += P^T dO
                    dk[n, kr].view(nt, Bq, D).baddbmm_(ds[:, :, cols].transpose(1, 2), qb, alpha=scale)
    for (r0, r1), pt in zip(geo.padded, p_pad, strict=True):
        nb = r1 - r0
        qt, kt, vt, (k0, k1), kfirst = _padded_tiles(q, k, v, geo, r0, r1)
        zero_pad = dout.new_zeros(N, nb * Bq - (min(L, r1 * Bq) - r0 * Bq), Dv)
        dot = torch.cat([dout[:, r0 * Bq : r1 * Bq], zero_pad], 1).view(N * nb, Bq, Dv)
        dlt = torch.cat([delta[:, r0 * Bq : r1 * Bq], zero_pad[..., 0]], 1).view(N * nb, Bq, 1)
        ok = geo.allowed(r0, r1)
        dqt = q.new_empty(N * nb, Bq, D)
        dkt = q.new_empty(N * nb, Kw, D)
        dvt = q.new_empty(N * nb, Kw, Dv)
        for i0, i1 in _ranges(N * nb, step):
            okb = ok[torch.arange(i0, i1, device=ok.device) % nb]
            p, ds = tile(qt[i0:i1], kt[i0:i1], vt[i0:i1], dot[i0:i1], dlt[i0:i1], okb,
                         None if pt is None else pt[i0:i1])
            dqt[i0:i1].baddbmm_(ds, kt[i0:i1], beta=0, alpha=scale)
            dkt[i0:i1].baddbmm_(ds.transpose(1, 2), qt[i0:i1], beta=0, alpha=scale)
            torch.bmm(p.transpose(1, 2), dot[i0:i1], out=dvt[i0:i1])
        dq[:, r0 * Bq : min(L, r1 * Bq)] = dqt.view(N, nb * Bq, D)[:, : min(L, r1 * Bq) - r0 * Bq]
        if k1 > k0:
            dk[:, k0:k1] += _fold(dkt, N, nb, geo)[:, k0 - kfirst : k1 - kfirst]
            dv[:, k0:k1] += _fold(dvt, N, nb, geo)[:, k0 - kfirst : k1 - kfirst]
    return dq, dk, dv


def _bounded(q: Tensor, k: Tensor, scale: float) -> bool:
    """True when every score scale * q_i . k_j is surely finite (|s| <= D max|q| max|k| scale < 1e30)."""
    if q.numel() == 0 or k.numel() == 0:
        return True
    qa, ka = (torch.aminmax(t) for t in (q, k))
    bound = q.shape[-1] * max(-float(qa.min), float(qa.max)) * max(-float(ka.min), float(ka.max)) * abs(scale)
    return bound < 1e30  # False for inf / NaN inputs too


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, geo: _Geometry, scale: float, want_lse: bool,
                training: bool):
        exact = not _bounded(q, k, scale)
        save_p = training and q.shape[0] * geo.nbq * geo.Bq * geo.Kw * q.element_size() <= _SAVE_P_BYTES
        out, lse, saved_p = _window_forward(q, k, v, geo, scale, exact, want_lse, save_p)
        ctx.save_for_backward(q, k, v, out)
        ctx.geo, ctx.scale, ctx.exact, ctx.saved_p = geo, scale, exact, saved_p
        if lse is None:
            lse = out.new_empty(0)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out = ctx.saved_tensors
        saved_p, ctx.saved_p = ctx.saved_p, None  # P is used once: free it with the step
        dq, dk, dv = _window_backward(q, k, v, out, dout.to(q.dtype).contiguous(), ctx.geo, ctx.scale, ctx.exact,
                                      saved_p)
        return dq, dk, dv, None, None, None, None


def window_attention(query: Tensor, key: Tensor, value: Tensor, *, left: int, right: int,
                     scale: float | None = None, block: int = 64,
                     return_weights: bool | str = False, return_lse: bool = False) -> Tensor | tuple[Tensor, ...]:
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
        block: query rows per tile (default 64); a tile holds ``block * ceil((block + left + right) / block)``
            keys, so work is about ``L * (block + left + right)`` pairs.
        return_weights: also return dense weights (*b, L, S), rebuilt from the log-sum-exp, or with
            ``"sparse"`` a sparse COO tensor of the band only.
        return_lse: also return the log-sum-exp (*b, L) (natural log, -inf on rows with no key).

    Returns:
        ``out`` (*b, L, Dv), then ``weights`` and ``lse`` as asked, in that order.

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
    geo = _Geometry(L, S, left, right, block, device=query.device)

    def prep(x: Tensor) -> Tensor:  # (*b, n, d) -> (N, n, d) contiguous in the accumulation dtype
        return x.reshape(N, *x.shape[-2:]).to(acc).contiguous()

    q_, k_, v_ = prep(q), prep(k), prep(v)
    training = torch.is_grad_enabled() and (q_.requires_grad or k_.requires_grad or v_.requires_grad)
    out, lse = _WindowAttention.apply(q_, k_, v_, geo, float(scale), bool(return_weights or return_lse), training)
    out = out.reshape(*batch, L, v.shape[-1]).to(query.dtype)  # (*b, L, Dv)
    lse = lse.reshape(*batch, L) if (return_weights or return_lse) else None
    weights = None
    if return_weights:
        plan = window_plan(L, S, left, right, block=block, device=query.device, batch_ndim=len(batch))
        if return_weights == "sparse":
            from attnkit.kernels.tiled import tiled_attention

            with torch.no_grad():
                weights = tiled_attention(q, k, v, plan, scale=float(scale), return_weights="sparse")[1]
        else:
            weights = weights_from_lse(q, k, lse, plan, float(scale)).to(query.dtype)
    if not (return_weights or return_lse):
        return out
    return (out,) + ((weights,) if return_weights else ()) + ((lse,) if return_lse else ())


# ---- the kernel contract (attnkit.kernels._contract) ---------------------------------------------------------

def supports(query, key, value, *, mask=None, **request) -> str | None:
    reason = softmax_dot_reason(**request)
    if reason:
        return reason
    if mask is None or mask.window() is None:
        return f"it needs mask=masks.window(left, right) with both widths finite; got {mask!r}"
    return None


def suits(query, key, value, *, mask=None, **_) -> bool:
    left, right = mask.window()
    L, S = query.shape[-2], key.shape[-2]
    return L * S >= 256 * 256 and 4 * (left + right + 1) <= S


def run(query, key, value, *, score, mask, scale, return_weights, return_lse=False, **_):
    left, right = mask.window()
    res = window_attention(query, key, value, left=left, right=right, scale=dot_scale(query, score, scale),
                           return_weights=return_weights, return_lse=return_lse)
    res = res if isinstance(res, tuple) else (res,)
    out, rest = res[0], list(res[1:])
    weights = rest.pop(0) if return_weights else None
    return out, weights, (rest.pop(0) if return_lse else None)
