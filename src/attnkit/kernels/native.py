"""The compiled CPU tile kernel behind the block plan: FlashAttention-2 forward and backward in C++.

The mask's plan (:class:`attnkit.masks.BlockMask`, ``block`` x ``block`` tiles) becomes CSR arrays over query
blocks: each block's key tiles in ascending order, each tile full (no mask evaluated) or partial (its boolean
tile, and the per-row interval of allowed keys where every row allows one: :func:`_spans`). The C++ kernel
(``kernels/csrc/tile_attention.cpp``, built by :mod:`attnkit.kernels._native`) runs, for every batch row and chunk
of 8 query blocks in parallel (``at::parallel_for``), the online softmax over runs of consecutive tiles:

    S = scale Q_b K_run^T  (-inf where a partial tile forbids) ;  m, l, O updated online ;  out = O / l
    lse = m + log l

in float32 on AVX2 register tiles over the columns each 6 rows can use (keys packed per chunk), elsewhere on one
BLAS GEMM per run read in place; and the backward per batch row (one writer for dK, dV: no atomics), recomputing
P from the saved lse:

    P = exp(S - lse) ;  dV += P^T dO ;  dS = P (dO V^T - rowsum(dO O)) ;  dQ = scale dS K ;  dK += scale dS^T Q

float32 and float64 run as they are; float16/bfloat16 are computed in float32 and cast back. A row with no allowed
key gets zero output, lse ``-inf`` and zero gradients. The forward checks every row it reads for NaN/inf
(:func:`run_checked`), so ``attention`` needs no separate pass over the inputs. Outputs come from a small cache of
freed buffers (``ATTNKIT_NATIVE_POOL_MB``, default 256 MiB, 0 = off). Where the extension is not built (no
compiler, ``ATTNKIT_NATIVE=0``) or the tensors are not on the CPU, ``run`` uses the pure-PyTorch block-sparse
kernel, and ``backend="auto"`` never picks this one.

Shape letters: ``*b`` batch dims flattened to N, L queries, S keys, D, Dv head dims, nq query blocks, T non-empty
tiles, P partial tiles, Nm batch rows of the mask (1 or N).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit import masks as _masks
from attnkit.kernels import _native
from attnkit.kernels._contract import dot_scale, softmax_dot_reason
from attnkit.masks import BlockMask
from attnkit.scores import ALiBi

__all__ = ["native_attention"]

_TILE = 64  # query rows and key columns of a tile: a +-128 window computes 320 keys a row for 257 needed


def _csr(plan: BlockMask, batch: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``ptr`` (nq + 1,), ``col`` (T,), ``part`` (T,) int64, ``forbid`` (P, Nm, Bq, Bk) bool, its ``span``
    (P, Nm, Bq, 2) int32 (:func:`_spans`) and ``first`` (T,) bool (:func:`_first_uses`) of ``plan``."""
    nq = -(-plan.L // plan.block)
    N = math.prod(batch)
    counts = torch.zeros(nq, dtype=torch.long)
    cols, parts, blocks, forbids = [], [], [], []
    offset = 0
    for grp in plan.groups:
        G, c = grp.ktiles.shape
        qb = grp.qblocks.cpu()
        counts[qb] = c
        part = torch.full((G, c), -1, dtype=torch.long)
        if grp.part_g is not None and grp.part_g.numel():
            P = grp.part_g.numel()
            part[grp.part_g.cpu(), grp.part_t.cpu()] = torch.arange(offset, offset + P)
            f = grp.forbid.cpu()  # (P, *mb, Bq, Bk)
            mb = f.shape[1:-2]
            if math.prod(mb) <= 1:
                f = f.reshape(P, 1, *f.shape[-2:])
            else:
                f = f.movedim(0, -3).expand(*batch, P, *f.shape[-2:]).reshape(N, P, *f.shape[-2:]).transpose(0, 1)
            forbids.append(f)
            offset += P
        blocks.append(qb)
        cols.append(grp.ktiles.cpu())
        parts.append(part)
    ptr = torch.zeros(nq + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(counts, 0)
    col = torch.zeros(int(ptr[-1]), dtype=torch.long)
    prt = torch.full_like(col, -1)
    for qb, c, p in zip(blocks, cols, parts, strict=True):
        at = ptr[qb].unsqueeze(-1) + torch.arange(c.shape[1])  # (G, c) positions in col
        col[at.flatten()], prt[at.flatten()] = c.flatten(), p.flatten()
    if forbids:
        nm = max(f.shape[1] for f in forbids)
        forbid = torch.cat([f.expand(f.shape[0], nm, *f.shape[2:]) for f in forbids]).contiguous()
    else:
        forbid = torch.zeros(0, 1, plan.block, plan.block, dtype=torch.bool)
    return ptr, col, prt, forbid, _spans(forbid), _first_uses(col)


def _first_uses(col: Tensor) -> Tensor:
    """``(T,)`` bool: whether tile position t is the first (in block order) to read key tile ``col[t]``."""
    first = torch.zeros(col.numel(), dtype=torch.bool)
    if col.numel():
        pos = torch.full((int(col.max()) + 1,), col.numel(), dtype=torch.long)
        pos = pos.scatter_reduce(0, col, torch.arange(col.numel()), "amin")
        first[pos[pos < col.numel()]] = True
    return first


def _spans(forbid: Tensor) -> Tensor:
    """``(P, Nm, Bq, 2)`` int32: each row's allowed interval ``[lo, hi)`` of a partial tile whose every row allows
    one interval (``lo = Bk, hi = 0`` for a row with none), and ``lo = -1`` on every row of the other tiles."""
    allowed = ~forbid
    Bk = forbid.shape[-1]
    cols = torch.arange(Bk)
    count = allowed.sum(-1)
    lo = torch.where(allowed, cols, Bk).amin(-1)
    hi = torch.where(allowed, cols + 1, 0).amax(-1)
    interval = ((count == hi - lo) | (count == 0)).flatten(1).all(-1)  # (P,)
    lo = torch.where(count == 0, Bk, lo)
    hi = torch.where(count == 0, 0, hi)
    lo = torch.where(interval[:, None, None], lo, -1)
    return torch.stack([lo, hi], -1).to(torch.int32).contiguous()


def _plan_arrays(plan: BlockMask, batch: tuple):
    return plan.remember(("native-csr", batch), lambda: _csr(plan, batch))


class _NativeAttention(torch.autograd.Function):
    """(N, L, D) q, (N, S, D) k, (N, S, Dv) v, contiguous float32/float64 -> out (N, L, Dv), lse (N, L)."""

    @staticmethod
    def forward(ctx, q, k, v, arrays, block: int, scale: float, slope: Tensor, check: bool):
        ext = _native.extension()
        out, lse, finite = ext.forward(q, k, v, *arrays, block, scale, slope, check)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.arrays, ctx.block, ctx.scale, ctx.slope = arrays, block, scale, slope
        ctx.mark_non_differentiable(lse, finite)
        return out, lse, finite

    @staticmethod
    def backward(ctx, dout, _dlse, _dfinite):
        q, k, v, out, lse = ctx.saved_tensors
        ext = _native.extension()
        dq, dk, dv = ext.backward(q, k, v, out, dout.to(q.dtype).contiguous(), lse, *ctx.arrays, ctx.block,
                                  ctx.scale, ctx.slope)
        return dq, dk, dv, None, None, None, None, None


def native_attention(query: Tensor, key: Tensor, value: Tensor, plan: BlockMask, *, scale: float | None = None,
                     alibi_slopes: Tensor | None = None, check_finite: bool = False) -> tuple[Tensor, Tensor] | None:
    """Softmax attention on the tiles of ``plan`` with the compiled kernel: ``(out, lse)``.

    Args:
        query, key, value: CPU floating tensors, batch dims broadcast.
        plan: the mask's :class:`~attnkit.masks.BlockMask` for ``(L, S)`` (whole tiles: ``mask.plan(L, S, block)``).
        scale: score multiplier (default ``1/sqrt(D)``).
        alibi_slopes: ``(H,)`` slopes of a fused ALiBi bias ``slope_h (j - i)`` (no gradient), heads being the
            last batch dim; None for none.
        check_finite: return None if a row the kernel read (a query row of a block with tiles, a key or value
            row of a tile in the plan) holds a NaN or an inf; it costs no pass of its own over the inputs.

    Shape:
        query (*b, L, D), key (*b, S, D), value (*b, S, Dv) -> out (*b, L, Dv), lse (*b, L).
    """
    batch = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    L, D, S, Dv = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 1.0
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    N = math.prod(batch)

    def prep(x: Tensor, n: int, d: int) -> Tensor:  # (*b, n, d) -> (N, n, d) contiguous in acc
        return x.expand(*batch, n, d).reshape(N, n, d).to(acc).contiguous()

    q, k, v = prep(query, L, D), prep(key, S, D), prep(value, S, Dv)
    if alibi_slopes is None:
        slope = torch.zeros(0, dtype=acc)
    else:  # one slope per batch row: heads are the last batch dim
        slope = alibi_slopes.detach().to(acc).expand(*batch[:-1], batch[-1]).reshape(N).contiguous()
    out, lse, finite = _NativeAttention.apply(q, k, v, _plan_arrays(plan, batch), plan.block, float(scale), slope,
                                              check_finite)
    if check_finite and not bool(finite):
        return None
    return out.reshape(*batch, L, Dv).to(query.dtype), lse.reshape(*batch, L)


# ---- the kernel contract (attnkit.kernels._contract) ---------------------------------------------------------

def plan_for(mask, query, key) -> BlockMask:
    L, S = query.shape[-2], key.shape[-2]
    mask = _masks.full() if mask is None else mask
    return mask.plan(L, S, _TILE, batch_ndim=max(query.ndim, key.ndim) - 2, device=torch.device("cpu"))


def _fused(score_mod) -> bool:
    return isinstance(score_mod, ALiBi)


def supports(query, key, value, *, mask=None, score_mod=None, **request) -> str | None:
    if score_mod is not None:
        if not _fused(score_mod):
            return "it fuses only the built-in score_mod attnkit.scores.alibi; use backend='tiled' for others"
        slopes = score_mod.slopes
        if slopes.requires_grad:
            return "its fused ALiBi slopes get no gradient; use backend='tiled' for learnable slopes"
        if query.ndim < 3 or torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])[-1] != slopes.numel():
            return f"its fused ALiBi needs a head dim of {slopes.numel()} (the slopes) before (L, D)"
        if request.get("return_weights"):
            return "it rebuilds no weights with a fused score_mod; use backend='tiled'"
    reason = softmax_dot_reason(**request)
    if reason:
        return reason
    if score_mod is None and (mask is None or mask.is_full):
        return "there is no mask, so no tile can be skipped; use backend='sdpa'"
    return None


def _compiled_here(query) -> bool:
    return query.device.type == "cpu" and _native.available()


def suits(query, key, value, *, mask=None, score_mod=None, **_) -> bool:
    """When built, on the CPU: from 256 x 256 pairs for masks whose plan keeps at most half of the tiles, and
    from 128 x 128 pairs for the fused ALiBi on any mask (else a ``score_mod`` goes to ``tiled``)."""
    L, S = query.shape[-2], key.shape[-2]
    if query.device.type != "cpu" or L * S < 128 * 128:
        return False
    if _fused(score_mod):
        return _compiled_here(query)
    if L * S < 256 * 256 or not _compiled_here(query):
        return False
    return plan_for(mask, query, key).density <= 0.5


def run(query, key, value, *, score, mask, scale, return_weights, return_lse=False, score_mod=None, **request):
    if not _compiled_here(query):  # the pure-PyTorch reference paths
        if score_mod is not None:
            from attnkit.kernels import tiled

            return tiled.run(query, key, value, score=score, score_mod=score_mod, mask=mask, scale=scale,
                             return_weights=return_weights, return_lse=return_lse, **request)
        from attnkit.kernels import blocksparse

        return blocksparse.run(query, key, value, score=score, mask=mask, scale=scale,
                               return_weights=return_weights, return_lse=return_lse, **request)
    return _run_compiled(query, key, value, score, mask, scale, return_weights, return_lse, score_mod, False)


def run_checked(query, key, value, *, score, mask, scale, return_weights, return_lse=False, score_mod=None,
                **request):
    """``run`` without the non-finite guard in front (:mod:`attnkit.functional._nonfinite`): None where the
    compiled kernel is not here or a row it read holds a NaN or an inf (the caller then applies the guard and
    calls ``run``). The kernel checks the rows as it reads them, which saves the guard's pass over q, k and v
    (4 ms of a 100 ms window forward at L=16384)."""
    if not _compiled_here(query):
        return None
    return _run_compiled(query, key, value, score, mask, scale, return_weights, return_lse, score_mod, True)


def _run_compiled(query, key, value, score, mask, scale, return_weights, return_lse, score_mod, check: bool):
    scale = dot_scale(query, score, scale)
    plan = plan_for(mask, query, key)
    slopes = score_mod.slopes if _fused(score_mod) else None
    result = native_attention(query, key, value, plan, scale=scale, alibi_slopes=slopes, check_finite=check)
    if result is None:
        return None
    out, lse = result
    weights = None
    if return_weights == "sparse":
        from attnkit.kernels.tiled import tiled_attention

        with torch.no_grad():
            weights = tiled_attention(query, key, value, plan, scale=scale, return_weights="sparse")[1]
    elif return_weights:
        from attnkit.kernels.blocksparse import weights_from_lse

        weights = weights_from_lse(query, key, lse, plan, scale).to(query.dtype)
    return out, weights, (lse.detach() if return_lse else None)
