"""Block-sparse softmax attention: compute scores only on the (query block, key tile) pairs a mask needs.

The queries are cut into blocks of ``block`` rows. A plan (:class:`attnkit.masks.BlockMask`, built once per mask
and shape by ``mask.plan(L, S)`` and remembered by the mask) gives each query block ``b`` the key indices
``kidx[b]`` of its non-empty tiles (or, for a window, one contiguous slice); blocks with the same number of
keys form a *group*, computed together with batched matmuls on one gather of the keys per step:

    S_b = scale * Q_b K[kidx_b]^T  (masked only on partially kept tiles)     (block_rows, Kw)
    lse_b = log sum_j exp(S_b)  ;  O_b = exp(S_b - lse_b) V[kidx_b]

A tile is empty (skipped), fully kept (no mask at all) or partial (its own boolean tile is applied). Each step
gathers the query blocks it computes and writes its output blocks straight into the result; tensors are moved
as whole blocks and tiles (one ``block * d`` run each), into buffers reused from step to step. Work and memory
are O(number of covered pairs); no (L, S) tensor is built (unless the caller asks for dense weights).
A group with no partial tile has nothing left to mask: on the CPU its steps run PyTorch's fused attention kernel
(the one behind ``F.scaled_dot_product_attention``, forward and backward, log-sum-exp included) on the gathered
keys, which keeps its scores in cache instead of writing them out; the other groups use the batched matmuls
below (and the GPU uses them for every group). Without gradients and weights the log-sum-exp is not needed and
unmasked groups use the fused softmax.
Backward (custom autograd) recomputes P = exp(S - lse) tile by tile from the saved log-sum-exp, as
FlashAttention does, and saves only q, k, v, out and lse:

    dV[kidx] += P^T dO ;  dS = P * (dO V^T - rowsum(dO * O)) ;  dQ = scale dS K ;  dK[kidx] += scale dS^T Q

A query row with no allowed key gets zero output, zero weights and finite (zero) gradients.

Shape letters: ``*b`` batch dims (e.g. B, H), L queries, S keys, D head dim, Dv value dim, Bq rows per
block, Kw keys per block of a group, G blocks in a group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit import masks as _masks
from attnkit.kernels._contract import check_qkv as _check
from attnkit.kernels._contract import dot_scale, softmax_dot_reason, split_steps
from attnkit.masks import BlockMask, Group

__all__ = ["blocksparse_attention", "run_plan", "weights_from_lse"]

Plan = BlockMask  # the kernels' name for the plan they run

_TILE = 128  # tile rows and columns of the plans auto uses
_BUDGET = 1 << 18  # score elements per step (batch included): a step's scores stay in the L2 cache
_FUSED_BUDGET = 1 << 20  # gathered key and value elements per step of a fused group (4 MiB in float32; 1 and 16 MiB
# steps were within noise of it at L=8192, 10 % of tiles)
_FUSED_HEADS = 1 << 20  # key and value elements of the batch rows a fused pass reads (4 MiB: they stay in L3)

# PyTorch's fused CPU attention (flash-style: tiled online softmax, returns the log-sum-exp) and its backward;
# the ops behind F.scaled_dot_product_attention on the CPU, private but present since torch 2.2
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused(grp: Group, q: Tensor, v: Tensor) -> bool:
    """Whether the group's steps run on PyTorch's fused CPU kernel: whole tiles with nothing to mask, on the CPU,
    and values as wide as queries (the kernel's requirement)."""
    return (not grp.masked and grp.ktiles is not None and q.device.type == "cpu" and q.shape[-1] == v.shape[-1]
            and _FLASH is not None and _FLASH_BWD is not None)


def _plain_steps(plan: Plan, q: Tensor, k: Tensor, v: Tensor, batch: tuple):
    """``grp, masks, (a, b), (n0, n1), sl, flat, kb, vb``: the steps of the groups the fused kernel does not take,
    group by group: group rows [a, b) (``sl`` their slice of the blocks in group order), batch rows [n0, n1), the
    group's :func:`_flat_masks`, key indices ``flat`` (g * Kw,) and the gathered keys and values (n, g, Kw, d)."""
    N, Bq, start = q.shape[0], plan.block, 0
    for grp in plan.groups:
        G, Kw = grp.kidx.shape
        if not _fused(grp, q, v):
            masks = _flat_masks(grp, batch)
            for (n0, n1), (a, b) in _steps(grp, N, Bq * Kw):
                flat = grp.kidx[a:b].flatten()
                yield (grp, masks, (a, b), (n0, n1), slice(start + a, start + b), flat,
                       _gather_keys(k, n0, n1, flat, b - a, Kw), _gather_keys(v, n0, n1, flat, b - a, Kw))
        start += G


def _fused_steps(plan: Plan, q: Tensor, k: Tensor, v: Tensor):
    """``grp, sl, (n0, n1), tiles, kb, vb``: the steps of the fused groups, batch rows outermost (each pass re-reads
    the keys and values of a few batch rows, which then stay in cache), ``sl`` the group rows' slice of the blocks
    in group order, ``tiles`` their key tile ids (g, c) and the gathered keys and values (n, g, c * block, d)."""
    N, S = k.shape[0], k.shape[1]
    per_row = max(1, S * (k.shape[-1] + v.shape[-1]))
    nrows = max(1, min(N, _FUSED_HEADS // per_row))
    starts, start = [], 0
    for grp in plan.groups:
        starts.append(start)
        start += grp.qblocks.shape[0]
    # buffers sized for the largest step: a whole group of ``nrows`` batch rows, or a step of the budget
    most = nrows * max((g.kidx.numel() for g in plan.groups if _fused(g, q, v)), default=0)
    dk, dv = k.shape[-1], v.shape[-1]
    kbuf, vbuf = (_Buffer(min(most * d, _FUSED_BUDGET * d // (dk + dv))) for d in (dk, dv))
    for r0 in range(0, N, nrows):
        r1 = min(N, r0 + nrows)
        for grp, st in zip(plan.groups, starts, strict=True):
            if not _fused(grp, q, v):
                continue
            Kw = grp.kidx.shape[1]
            for (n0, n1), (a, b) in _steps(grp, r1 - r0, Kw * (k.shape[-1] + v.shape[-1]), _FUSED_BUDGET):
                n0, n1, tiles = r0 + n0, r0 + n1, grp.ktiles[a:b]
                kb = _gather_tiles(k, n0, n1, tiles, plan.block, kbuf)
                yield grp, slice(st + a, st + b), (n0, n1), tiles, kb, _gather_tiles(v, n0, n1, tiles, plan.block, vbuf)


def _steps(grp: Group, N: int, per: int, budget: int = _BUDGET):
    """The steps of a group (:func:`attnkit.kernels._contract.split_steps`)."""
    return split_steps(grp.kidx.shape[0], N, per, budget)


def _flat_masks(grp: Group, batch: tuple) -> tuple[Tensor | None, Tensor | None]:
    """The group's masks with the batch flattened: ``allowed`` (N|1, G, Bq, Kw) and ``forbid`` (P, N|1, Bq, Bk)."""
    def flat(t: Tensor) -> Tensor:  # (*mb, X, Y, Z) -> (N|1, X, Y, Z)
        if math.prod(t.shape[:-3]) <= 1:
            return t.reshape(1, *t.shape[-3:])
        return t.expand(*batch, *t.shape[-3:]).reshape(math.prod(batch), *t.shape[-3:])

    if grp.allowed is not None:
        return flat(grp.allowed), None
    if grp.forbid is None or grp.forbid.shape[0] == 0:
        return None, None
    return None, flat(grp.forbid.movedim(0, -3)).movedim(-3, 0)


def _mask_scores(s: Tensor, grp: Group, masks: tuple, block: int, a: int, b: int, n0: int, n1: int,
                 sel: Tensor | None = None) -> Tensor:
    """Set the forbidden scores of batch rows [n0, n1) and group rows [a, b) (or the rows ``sel``) to -inf, in
    place; returns ``s``. ``masks`` = :func:`_flat_masks`. Fully kept tiles are not touched; a partial tile is
    gathered, filled and written back.

    Shape:
        s (n, g, Bq, Kw) with n = n1 - n0, g = b - a (or len(sel)).
    """
    allowed, forbid = masks
    if allowed is not None:
        al = allowed[:, a:b] if sel is None else allowed.index_select(1, sel)  # (N|1, g, Bq, Kw)
        return s.masked_fill_((al if al.shape[0] == 1 else al[n0:n1]).logical_not(), float("-inf"))
    if forbid is None:
        return s
    if sel is None:
        lo, hi = torch.searchsorted(grp.part_g, torch.tensor([a, b], device=s.device)).tolist()
        gi, ti, f = grp.part_g[lo:hi] - a, grp.part_t[lo:hi], forbid[lo:hi]
    else:
        pos = torch.full((grp.qblocks.shape[0],), -1, dtype=torch.long, device=s.device)
        pos[sel] = torch.arange(sel.shape[0], device=s.device)  # group row -> row of s
        at = pos[grp.part_g]
        keep = torch.nonzero(at >= 0).flatten()
        gi, ti, f = at[keep], grp.part_t[keep], forbid.index_select(0, keep)
    if gi.numel() == 0:
        return s
    f = f if f.shape[1] == 1 else f[:, n0:n1]  # (p, n|1, Bq, Bk)
    s5 = s.unflatten(-1, (-1, block))  # (n, g, Bq, c, Bk)
    idx = (slice(None), gi, slice(None), ti)  # the partial tiles: (p, n, Bq, Bk)
    s5[idx] = s5[idx].masked_fill_(f, float("-inf"))
    return s


class _Buffer:
    """Storage that the steps of one call write their gathered inputs into, instead of a fresh tensor per step:
    fresh multi-MB tensors fault in new pages every time (a 2 MB tile gather took 1 ms inside the kernel against
    0.09 ms on its own). Allocated on first use with at least ``hint`` elements, so a call whose steps grow does
    not reallocate at each of them; grown when a step needs more."""

    def __init__(self, hint: int = 0):
        self.t: Tensor | None = None
        self.hint = hint

    def view(self, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A (contiguous) tensor of ``shape`` on ``like``'s dtype and device in this buffer's storage."""
        size = math.prod(shape)
        if self.t is None or self.t.numel() < size or self.t.dtype != like.dtype or self.t.device != like.device:
            self.t = like.new_empty(max(size, self.hint))
        return self.t[:size].view(shape)


def _gather_keys(x: Tensor, n0: int, n1: int, flat: Tensor, g: int, Kw: int) -> Tensor:
    """Rows ``flat`` (g * Kw,) of batch rows [n0, n1) of ``x`` (N, S, d), blocked: (n, g, Kw, d). A single batch
    row gathers along its first dim, a plain copy of whole rows (index_select's fastest path)."""
    if n1 - n0 == 1:
        return x[n0].index_select(0, flat).view(1, g, Kw, x.shape[-1])
    return x[n0:n1].index_select(1, flat).unflatten(1, (g, Kw))


def _gather_tiles(x: Tensor, n0: int, n1: int, tiles: Tensor, block: int, buf: _Buffer) -> Tensor:
    """Whole key tiles ``tiles`` (g, c) of batch rows [n0, n1) of ``x`` (N, S, d): (n, g, c * block, d), the same
    as :func:`_gather_keys` on their rows, but each tile is copied as one ``block * d`` run (a row-major ``x``
    views as (N, S // block, block * d)), into ``buf``; ``x`` with other strides falls back to the row gather."""
    n, (g, c), d = n1 - n0, tiles.shape, x.shape[-1]
    if x.stride(-1) != 1 or x.stride(-2) != d:
        rows = (tiles.unsqueeze(-1) * block + torch.arange(block, device=x.device)).flatten()
        return _gather_keys(x, n0, n1, rows, g, c * block)
    nt = x.shape[-2] // block  # fused tiles hold no padding, so they all lie below nt * block
    xt = x[n0:n1, : nt * block].view(n, nt, block * d)
    if n == 1:
        return _take(xt[0], tiles.flatten(), buf).view(1, g, c * block, d)
    out = buf.view(x, (n, g * c, block * d))
    return torch.index_select(xt, 1, tiles.flatten(), out=out).view(n, g, c * block, d)


def _add_tiles(acc: Tensor, n0: int, n1: int, tiles: Tensor, grad: Tensor, block: int) -> None:
    """``acc[n0:n1]`` at the rows of key tiles ``tiles`` (g, c) += ``grad`` (n, g, c * block, d), one whole tile per
    added run (a tile that appears twice gets both); ``acc`` (N, S, d) is a fresh contiguous buffer."""
    n, d = n1 - n0, acc.shape[-1]
    nt = acc.shape[-2] // block
    acc[n0:n1, : nt * block].view(n, nt, block * d).index_add_(1, tiles.flatten(), grad.reshape(n, -1, block * d))


def _order(plan: Plan, device) -> Tensor:
    """The plan's query blocks in group order (each group's blocks are then one contiguous slice): (n,)."""
    if not plan.groups:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([g.qblocks for g in plan.groups]).to(device)


def _blocked(x: Tensor, Bq: int) -> Tensor:
    """(N, L, d) -> (N * nbq, Bq * d): whole query blocks as rows (zero-padded past L)."""
    N, L, d = x.shape
    nbq = -(-L // Bq)
    if nbq * Bq != L:
        x = F.pad(x, (0, 0, 0, nbq * Bq - L))
    return x.reshape(N * nbq, Bq * d)


def _block_ids(order: Tensor, N: int, nbq: int) -> Tensor:
    """Rows of :func:`_blocked` for the blocks ``order`` (n,) of every batch row: (N, n)."""
    return torch.arange(N, device=order.device).unsqueeze(-1) * nbq + order


def _step_rows(ids: Tensor, n0: int, n1: int, sl: slice) -> Tensor:
    """Rows of :func:`_blocked` for batch rows [n0, n1) and the blocks ``sl`` (in group order) of a step: (n * g,)."""
    return ids[n0, sl] if n1 - n0 == 1 else ids[n0:n1, sl].flatten()


def _take(x: Tensor, rows: Tensor, buf: _Buffer) -> Tensor:
    """Rows ``rows`` of ``x`` (R, X), written into ``buf``: (len(rows), X)."""
    return torch.index_select(x, 0, rows, out=buf.view(x, (rows.shape[0], x.shape[1])))


def _new_blocks(x: Tensor, N: int, nbq: int, width: int, order: Tensor, fill: float) -> Tensor:
    """An uninitialized (N * nbq, width) result of blocks, ``fill`` on the blocks not in ``order`` (the steps write
    each block of ``order`` once, so no fill pass is needed when every block is there)."""
    out = x.new_empty(N * nbq, width)
    if order.shape[0] < nbq:
        missing = torch.ones(nbq, dtype=torch.bool, device=x.device)
        missing[order] = False
        out.view(N, nbq, width)[:, missing] = fill
    return out


def _forward(q: Tensor, k: Tensor, v: Tensor, plan: Plan, scale: float, batch: tuple,
             need_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """Output (N, L, Dv) and log-sum-exp (N, L) of flattened inputs (``batch`` = their batch shape, for the
    masks); without ``need_lse`` (inference) unmasked groups use the fused softmax and the lse is None.

    Each step gathers its query blocks (whole blocks, into a reused buffer) and writes its output blocks straight
    into the result, so no (N, L, D) copy of the queries or of the output is made on the way."""
    N, L, D = q.shape
    Bq, Dv = plan.block, v.shape[-1]
    nbq = -(-L // Bq)
    order = _order(plan, q.device)
    ids = _block_ids(order, N, nbq)  # (N, n)
    qb = _blocked(q, Bq)  # (N * nbq, Bq * D)
    out = _new_blocks(q, N, nbq, Bq * Dv, order, 0.0).view(N * nbq, Bq, Dv)
    lse = _new_blocks(q, N, nbq, Bq, order, float("-inf")) if need_lse else None  # (N * nbq, Bq)
    qbuf = _Buffer(min(qb.numel(), _FUSED_BUDGET))
    for grp, masks, (a, b), (n0, n1), sl, _, kb, vb in _plain_steps(plan, q, k, v, batch):
        rows = _step_rows(ids, n0, n1, sl)
        qs = _take(qb, rows, qbuf).view(n1 - n0, b - a, Bq, D).mul_(scale)
        # S = (scale Q) K^T, -inf where the mask forbids
        s = _mask_scores(torch.matmul(qs, kb.transpose(-1, -2)), grp, masks, Bq, a, b, n0, n1)
        if not (need_lse or grp.masked):  # every row has a key: O = softmax(S) V, one fused pass
            out.index_copy_(0, rows, torch.matmul(torch.softmax(s, -1), vb).view(-1, Bq, Dv))
            continue
        m = s.amax(-1, keepdim=True)  # (n, g, Bq, 1)
        if grp.masked:  # a row with no allowed key: m = -inf -> 0, so nothing becomes NaN
            m.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        p = s.sub_(m).exp_()  # (n, g, Bq, Kw)
        l = p.sum(-1, keepdim=True)  # (n, g, Bq, 1)
        # O = P V / l
        o = torch.matmul(p, vb)  # (n, g, Bq, Dv)
        o = o.div_(torch.where(l > 0, l, torch.ones_like(l))) if grp.masked else o.div_(l)
        out.index_copy_(0, rows, o.view(-1, Bq, Dv))
        if need_lse:
            lse.index_copy_(0, rows, l.log_().add_(m).view(-1, Bq))  # lse = m + log l (-inf on empty rows)
    # groups with nothing to mask: O, lse = the fused kernel on each block and its gathered keys
    for _, sl, (n0, n1), _, kb, vb in _fused_steps(plan, q, k, v):
        rows = _step_rows(ids, n0, n1, sl)
        o, l = _FLASH(_take(qb, rows, qbuf).view(n1 - n0, -1, Bq, D), kb, vb, scale=scale)  # (n, g, Bq, Dv|-)
        out.index_copy_(0, rows, o.reshape(-1, Bq, Dv))
        if need_lse:
            lse.index_copy_(0, rows, l.reshape(-1, Bq))
    out = out.view(N, nbq * Bq, Dv)[:, :L]  # (N, L, Dv)
    return out, (lse.view(N, nbq * Bq)[:, :L] if need_lse else None)


def _backward(q, k, v, out, lse, dout, plan: Plan, scale: float, batch: tuple):
    N, L, D = q.shape
    Bq = plan.block
    nbq = -(-L // Bq)
    order = _order(plan, q.device)
    ids = _block_ids(order, N, nbq)  # (N, n)
    qb, dob = _blocked(q, Bq), _blocked(dout, Bq)  # (N * nbq, Bq * D|Dv)
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij
    delta = _blocked((dout * out).sum(-1, keepdim=True), Bq)  # (N * nbq, Bq)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # empty rows: P = 0
    lseb = _blocked(lse.unsqueeze(-1), Bq)  # (N * nbq, Bq); padded rows are masked anyway
    outb = _blocked(out, Bq) if any(_fused(g, q, v) for g in plan.groups) else None  # (N * nbq, Bq * Dv)
    dq = _new_blocks(q, N, nbq, Bq * D, order, 0.0).view(N * nbq, Bq, D)
    dk = k.new_zeros(k.shape)  # contiguous, so whole tiles view as rows
    dv = v.new_zeros(v.shape)
    qbuf, dbuf, obuf = (_Buffer(min(qb.numel(), _FUSED_BUDGET)) for _ in range(3))
    for grp, masks, (a, b), (n0, n1), sl, flat, kb, vb in _plain_steps(plan, q, k, v, batch):
        rows, shape = _step_rows(ids, n0, n1, sl), (n1 - n0, b - a, Bq, -1)
        qs, dos = _take(qb, rows, qbuf).view(shape).mul_(scale), _take(dob, rows, dbuf).view(shape)
        # P = exp(S - lse), recomputed
        s = _mask_scores(torch.matmul(qs, kb.transpose(-1, -2)), grp, masks, Bq, a, b, n0, n1)
        p = s.sub_(lseb.index_select(0, rows).view(shape[:-1] + (1,))).exp_()  # (n, g, Bq, Kw)
        # dV[kidx] += P^T dO
        dv[n0:n1].index_add_(1, flat, torch.matmul(p.transpose(-1, -2), dos).flatten(1, 2))
        # dS = P * (dO V^T - delta)
        ds = torch.matmul(dos, vb.transpose(-1, -2)).sub_(delta.index_select(0, rows).view(shape[:-1] + (1,)))
        ds = ds.mul_(p)
        dq.index_copy_(0, rows, torch.matmul(ds, kb).mul_(scale).view(-1, Bq, D))  # dQ = scale dS K
        dk[n0:n1].index_add_(1, flat, torch.matmul(ds.transpose(-1, -2), qs).flatten(1, 2))  # dK += dS^T (sQ)
    # groups with nothing to mask: the fused kernel's backward on the gathered keys, dK and dV added to their rows
    for _, sl, (n0, n1), tiles, kb, vb in _fused_steps(plan, q, k, v):
        rows, shape = _step_rows(ids, n0, n1, sl), (n1 - n0, -1, Bq, D)
        gq, gk, gv = _FLASH_BWD(_take(dob, rows, dbuf).view(shape), _take(qb, rows, qbuf).view(shape), kb, vb,
                                _take(outb, rows, obuf).view(shape), lseb.index_select(0, rows).view(shape[:-1]),
                                0.0, False, scale=scale)
        dq.index_copy_(0, rows, gq.reshape(-1, Bq, D))
        _add_tiles(dk, n0, n1, tiles, gk, Bq)
        _add_tiles(dv, n0, n1, tiles, gv, Bq)
    return dq.view(N, nbq * Bq, D)[:, :L], dk, dv


class _BlockSparse(torch.autograd.Function):
    """Flattened inputs (N, L, D), (N, S, D), (N, S, Dv) in the accumulation dtype -> out (N, L, Dv), lse (N, L)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: Plan, scale: float, batch: tuple):
        out, lse = _forward(q, k, v, plan, scale, batch)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.batch = plan, scale, batch
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout.to(q.dtype), ctx.plan, ctx.scale, ctx.batch)
        return dq, dk, dv, None, None, None


def _prepare(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Broadcast the batch dims of q, k, v to one shape (keys/values are expanded, not copied)."""
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    q = query.expand(*batch, *query.shape[-2:])
    k = key.expand(*batch, *key.shape[-2:])
    v = value.expand(*batch, *value.shape[-2:])
    return q, k, v


def run_plan(query: Tensor, key: Tensor, value: Tensor, plan: Plan, *, scale: float | None = None,
             return_weights: bool | str = False, return_lse: bool = False) -> Tensor | tuple[Tensor, ...]:
    """Run softmax attention on the tiles of ``plan`` (see the module docstring).

    Returns ``out`` (*b, L, Dv), then (as asked) weights (*b, L, S), dense and rebuilt from the log-sum-exp
    (zeros outside the tiles) or ``"sparse"`` (a COO tensor of the computed pairs), and the log-sum-exp (*b, L).
    """
    q, k, v = _prepare(query, key, value)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    *batch, L, D = q.shape
    S, acc = k.shape[-2], _acc_dtype(q.dtype)
    # batch dims flattened: (N, L, D), (N, S, D), (N, S, Dv)
    N = math.prod(batch)
    qf, kf, vf = q.reshape(N, L, D).to(acc), k.reshape(N, S, D).to(acc), v.reshape(N, S, v.shape[-1]).to(acc)
    want_lse = bool(return_weights or return_lse)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _BlockSparse.apply(qf, kf, vf, plan, float(scale), tuple(batch))
    else:  # inference: no autograd record, and no log-sum-exp unless the weights are wanted
        out, lse = _forward(qf, kf, vf, plan, float(scale), tuple(batch), need_lse=want_lse)
    out = out.reshape(*batch, L, v.shape[-1]).to(q.dtype)  # (*b, L, Dv)
    if not want_lse:
        return out
    lse = lse.reshape(*batch, L)  # (*b, L)
    res = [out]
    if return_weights == "sparse":
        from attnkit.kernels.tiled import tiled_attention

        with torch.no_grad():
            res.append(tiled_attention(q, k, v, plan, scale=float(scale), return_weights="sparse")[1])
    elif return_weights:
        res.append(weights_from_lse(q, k, lse, plan, float(scale)).to(q.dtype))
    if return_lse:
        res.append(lse.detach())
    return tuple(res)


def weights_from_lse(q: Tensor, k: Tensor, lse: Tensor, plan: Plan, scale: float,
                     rows: Tensor | None = None) -> Tensor:
    """Attention weights exp(S - lse) on the plan's tiles, scattered into a dense (*b, L, S) tensor.

    With ``rows`` (1-D query indices) only those rows are returned: (*b, len(rows), S).
    Gradients flow to ``q`` and ``k`` (each row is renormalized over its tiles, so they are exact).
    """
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], lse.shape[:-1])
    L, D, S, Bq = q.shape[-2], q.shape[-1], k.shape[-2], plan.block
    nbq = -(-L // Bq)
    acc = _acc_dtype(q.dtype)
    N = math.prod(batch)
    qf = q.expand(*batch, L, D).reshape(N, L, D).to(acc)  # (N, L, D)
    ka = k.expand(*batch, S, D).reshape(N, S, D).to(acc)  # (N, S, D)
    qp = F.pad(qf, (0, 0, 0, nbq * Bq - L)).view(N, nbq, Bq, D)
    lse_p = F.pad(lse.expand(*batch, L).reshape(N, L), (0, nbq * Bq - L), value=float("-inf"))
    lse_p = torch.where(torch.isfinite(lse_p), lse_p, torch.full_like(lse_p, float("inf")))
    lse_p = lse_p.view(N, nbq, Bq, 1)
    want = None
    if rows is not None:
        want = torch.zeros(nbq * Bq, dtype=torch.bool, device=q.device)
        want[rows] = True
        want = want.view(nbq, Bq).any(1)  # (nbq,): blocks holding a wanted row
    full = qf.new_zeros(N, nbq, Bq, S)
    for grp in plan.groups:
        G, Kw = grp.kidx.shape
        sel = None if want is None else torch.nonzero(want[grp.qblocks]).flatten()
        if sel is not None and sel.numel() == 0:
            continue
        blocks = grp.qblocks if sel is None else grp.qblocks[sel]
        kidx = grp.kidx if sel is None else grp.kidx[sel]
        qb = qp.index_select(1, blocks)  # (N, g, Bq, D)
        kb = ka.index_select(1, kidx.flatten()).unflatten(1, (blocks.shape[0], Kw))  # (N, g, Kw, D)
        s = _mask_scores(qb @ kb.transpose(-1, -2) * scale, grp, _flat_masks(grp, tuple(batch)), Bq, 0, G, 0, N,
                         sel)  # (N, g, Bq, Kw)
        e = torch.exp(s - lse_p.index_select(1, blocks))  # (N, g, Bq, Kw)
        # every allowed key of a row lies in its block's tiles, so this sum is 1 up to rounding; dividing by
        # it makes the weights' gradient exact (the saved lse is a constant to autograd)
        tot = e.sum(-1, keepdim=True)
        w = e / torch.where(tot > 0, tot, torch.ones_like(tot))
        dense = w.new_zeros(*w.shape[:-1], S).scatter_add(
            -1, kidx.unsqueeze(-2).expand(*w.shape), w
        )  # (N, g, Bq, S); clamped padding keys add exact zeros
        full = full.index_copy(1, blocks, dense)
    full = full.flatten(1, 2)[:, :L].reshape(*batch, L, S)  # (*b, L, S)
    return full if rows is None else full.index_select(-2, rows)


def blocksparse_attention(query: Tensor, key: Tensor, value: Tensor, mask: _masks.Mask | Tensor, *,
                          scale: float | None = None, block: int = 128,
                          return_weights: bool | str = False, return_lse: bool = False
                          ) -> Tensor | tuple[Tensor, ...]:
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
    plan = mask.plan(L, S, block, batch_ndim=batch_ndim, device=query.device)
    return run_plan(query, key, value, plan, scale=scale, return_weights=return_weights, return_lse=return_lse)




# ---- the kernel contract (attnkit.kernels._contract) ---------------------------------------------------------

def supports(query, key, value, *, mask=None, **request) -> str | None:
    reason = softmax_dot_reason(**request)
    if reason:
        return reason
    if mask is None or mask.is_full:
        return "there is no mask, so no tile can be skipped; use backend='sdpa'"
    return None


def suits(query, key, value, *, mask=None, **_) -> bool:
    """Worth it when at most 30 % of the tiles hold an allowed pair, from 512 x 512 pairs."""
    L, S = query.shape[-2], key.shape[-2]
    if L * S < 512 * 512:
        return False
    return mask.plan(L, S, _TILE, batch_ndim=max(query.ndim, key.ndim) - 2, device=query.device).density <= 0.3


def run(query, key, value, *, score, mask, scale, return_weights, return_lse=False, **_):
    L, S = query.shape[-2], key.shape[-2]
    plan = mask.plan(L, S, _TILE, batch_ndim=max(query.ndim, key.ndim) - 2, device=query.device)
    res = run_plan(query, key, value, plan, scale=dot_scale(query, score, scale), return_weights=return_weights,
                   return_lse=return_lse)
    res = res if isinstance(res, tuple) else (res,)
    out, rest = res[0], list(res[1:])
    weights = rest.pop(0) if return_weights else None
    return out, weights, (rest.pop(0) if return_lse else None)
