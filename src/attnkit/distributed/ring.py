"""Ring attention over ``torch.distributed``: each rank holds a slice of the sequence, key/value rows travel
between ranks, partial outputs merge by log-sum-exp (Liu et al., "Ring Attention", 2023,
https://arxiv.org/abs/2310.01889).

The ring runs ``P - 1`` rounds after the local block. In round ``s`` every rank ``r`` sends to ``r + s`` and
receives from ``r - s`` (each round is one rotation of the ring), posted with ``batch_isend_irecv`` before the
previous round's block is computed, so the transfer overlaps the compute. What travels is only what the receiver's
queries may see (:class:`~attnkit.distributed.schedule.Schedule`): nothing for an empty pair (causal: no key
goes backward in the contiguous layout), the halo rows for a window narrower than a slice, whatever ``P``.
Both ends derive every transfer from the same global mask, so no send waits for a receive that never comes.

Backward: the same rounds carry key/value rows again (nothing ``L``-sized is kept from the forward), each rank
computes its blocks' gradients from the global ``out`` and ``lse`` of its queries, and sends the key/value
gradients of the rows it received back to their owner in the same round (the reverse rotation).
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit.distributed import block as _block
from attnkit.distributed import nonfinite as _nonfinite
from attnkit.distributed.layout import check_layout, segments
from attnkit.distributed.schedule import Schedule
from attnkit.masks import Mask, as_mask, full

__all__ = ["ring_attention", "traffic", "reset_traffic"]

_DTYPES = [torch.float32, torch.float64]
_TRAFFIC = {"bytes_sent": 0, "messages": 0}
_KV, _DKV = 1, 2  # message kinds (gloo matches sends to receives by tag)


def traffic() -> dict[str, int]:
    """Bytes and messages this process has sent through :func:`ring_attention` since the last reset."""
    return dict(_TRAFFIC)


def reset_traffic() -> None:
    _TRAFFIC.update(bytes_sent=0, messages=0)


class _Ring:
    """One call's communication: ranks of the group, the schedule, posting and waiting on rounds."""

    def __init__(self, group, sched: Schedule, rank: int, P: int, timeout: timedelta | None):
        self.group, self.sched, self.rank, self.P, self.timeout = group, sched, rank, P, timeout

    def peer(self, r: int) -> int:
        r %= self.P
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def post(self, ops: list) -> list:
        if not ops:
            return []
        return dist.batch_isend_irecv(ops)

    def wait(self, works: list) -> None:
        for w in works:
            w.wait() if self.timeout is None else w.wait(self.timeout)

    def send(self, t: Tensor, to: int, kind: int, s: int) -> dist.P2POp:
        _TRAFFIC["bytes_sent"] += t.numel() * t.element_size()
        _TRAFFIC["messages"] += 1
        return dist.P2POp(dist.isend, t, self.peer(to), self.group, tag=kind * self.P + s)

    def recv(self, t: Tensor, frm: int, kind: int, s: int) -> dist.P2POp:
        return dist.P2POp(dist.irecv, t, self.peer(frm), self.group, tag=kind * self.P + s)

    def kv_round(self, k: Tensor, v: Tensor, s: int) -> tuple[list, Tensor | None]:
        """Post round ``s``: send my rows that ``r + s`` needs, receive the rows I need from ``r - s``; the
        works and the receive buffer (keys and values side by side), None when nothing comes."""
        r, P, sc = self.rank, self.P, self.sched
        dst, src = (r + s) % P, (r - s) % P
        ops, buf = [], None
        index = sc.local_index(r, dst)
        if index:
            ops.append(self.send(torch.cat([gather_rows(k, index), gather_rows(v, index)], dim=-1), dst, _KV, s))
        n = sc.rows(src, r)
        if n:
            buf = k.new_empty(*k.shape[:2], n, k.shape[-1] + v.shape[-1])  # (B, Hkv, n, D + Dv): one message
            ops.append(self.recv(buf, src, _KV, s))
        return self.post(ops), buf


def gather_rows(x: Tensor, index: list[tuple[int, int, int]]) -> Tensor:
    """The rows ``(local start, _, length)`` of ``x`` (B, H, n, d) concatenated: (B, H, rows, d)."""
    return torch.cat([x[:, :, a:a + n] for a, _, n in index], dim=2)


def _split(buf: Tensor, D: int) -> tuple[Tensor, Tensor]:
    """A received ``(B, H, n, D + Dv)`` message as contiguous keys and values (the kernels gather rows of them)."""
    return buf[..., :D].contiguous(), buf[..., D:].contiguous()


def _compute(q, k, v, blocks, sched, scale, acc: dict) -> None:
    """Forward of the blocks with keys ``k`` and values ``v``, merged into ``acc[query row] = (out, lse)``."""
    for ql, qg, nq, kl, kg, nk in blocks:
        o, l = _block.block_forward(q[:, :, ql:ql + nq], k[:, :, kl:kl + nk], v[:, :, kl:kl + nk], sched.mask,
                                    qg, kg, sched.L, sched.S, scale)
        acc[ql] = _block.merge(*acc.get(ql, (None, None)), o, l)


def _assemble(acc: dict, q: Tensor, Dv: int) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of every local query row from the merged segments (zeros / -inf where nothing was seen)."""
    n = q.shape[2]
    if list(acc) == [0] and acc[0][0].shape[2] == n:
        return acc[0]
    out = q.new_zeros(*q.shape[:-1], Dv)  # (B, Hq, l, Dv)
    lse = q.new_full(q.shape[:-1], float("-inf"))  # (B, Hq, l)
    for ql, (o, l) in acc.items():
        out[:, :, ql:ql + o.shape[2]], lse[:, :, ql:ql + o.shape[2]] = o, l
    return out, lse


def _grad(q, k, v, blocks, sched, scale, lse, dout, delta, dq, dk, dv) -> None:
    """Backward of the blocks with ``k``, ``v``: adds into ``dq`` (B, Hq, l, D) and ``dk``, ``dv`` (their rows)."""
    for ql, qg, nq, kl, kg, nk in blocks:
        _block.block_backward(
            q[:, :, ql:ql + nq], k[:, :, kl:kl + nk], v[:, :, kl:kl + nk], lse[:, :, ql:ql + nq],
            dout[:, :, ql:ql + nq], delta[:, :, ql:ql + nq], sched.mask, qg, kg, sched.L, sched.S, scale,
            sched.key_range, sched.band, sched.tile,
            dq[:, :, ql:ql + nq], dk[:, :, kl:kl + nk], dv[:, :, kl:kl + nk])


def _land(ring: _Ring, dk: Tensor, dv: Tensor, works: list, got: Tensor | None, index) -> None:
    """Wait for a round's key/value gradients and add those sent to me into ``dk``, ``dv`` at their rows."""
    ring.wait(works)
    if got is not None:
        D, off = dk.shape[-1], 0
        for a, _, n in index:
            dk[:, :, a:a + n] += got[:, :, off:off + n, :D]
            dv[:, :, a:a + n] += got[:, :, off:off + n, D:]
            off += n


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring, scale: float):
        r, P, sc = ring.rank, ring.P, ring.sched
        D = k.shape[-1]
        acc: dict = {}
        pending = ring.kv_round(k, v, 1) if P > 1 else ([], None)
        _compute(q, k, v, sc.blocks(r, r, True), sc, scale, acc)
        for s in range(1, P):
            works, buf = pending
            pending = ring.kv_round(k, v, s + 1) if s + 1 < P else ([], None)
            ring.wait(works)
            if buf is not None:
                _compute(q, *_split(buf, D), sc.blocks(r, (r - s) % P, False), sc, scale, acc)
                del buf
        out, lse = _assemble(acc, q, v.shape[-1])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale = ring, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale, D = ctx.ring, ctx.scale, k.shape[-1]
        r, P, sc = ring.rank, ring.P, ring.sched
        dout = dout.contiguous()
        delta = (dout * out).sum(-1)  # (B, Hq, l): rowsum(dO O)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        pending = ring.kv_round(k, v, 1) if P > 1 else ([], None)
        _grad(q, k, v, sc.blocks(r, r, True), sc, scale, lse, dout, delta, dq, dk, dv)
        back: list = []  # gradients in flight: (works, buffer received, rows of mine it belongs to)
        for s in range(1, P):
            works, buf = pending
            pending = ring.kv_round(k, v, s + 1) if s + 1 < P else ([], None)
            ring.wait(works)
            src, dst = (r - s) % P, (r + s) % P
            ops, got = [], None
            if buf is not None:
                kb, vb = _split(buf, D)
                gk, gv = torch.zeros_like(kb), torch.zeros_like(vb)
                _grad(q, kb, vb, sc.blocks(r, src, False), sc, scale, lse, dout, delta, dq, gk, gv)
                ops.append(ring.send(torch.cat([gk, gv], dim=-1), src, _DKV, s))  # src's rows' gradients go home
            index = sc.local_index(r, dst)
            if index:
                got = k.new_empty(*k.shape[:2], sum(n for _, _, n in index), D + v.shape[-1])
                ops.append(ring.recv(got, dst, _DKV, s))
            back.append((ring.post(ops), got, index))
            if len(back) > 1:  # the previous round's gradients: at most two rounds' buffers alive
                _land(ring, dk, dv, *back.pop(0))
        for item in back:
            _land(ring, dk, dv, *item)
        return dq, dk, dv, None, None


def _local_meta(query, key, value, layout, scale) -> list[int]:
    """This rank's shapes as integers, after the checks one rank can make alone (raises on a bad argument)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor (B, H, L_r, D); got {type(t).__name__}.")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L_r, D), this rank's slice of the sequence; got shape "
                             f"{tuple(t.shape)}.")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32 or float64 (half precision across ranks is not implemented: "
                            f"cast to float32); got {t.dtype}.")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}.")
    B, Hq, Lq, D = query.shape
    if key.shape[:3] != value.shape[:3] or key.shape[0] != B or key.shape[-1] != D:
        raise ValueError(f"key (B, Hkv, S_r, D) and value (B, Hkv, S_r, Dv) must match query (B, Hq, L_r, D) = "
                         f"{tuple(query.shape)} in B and D and each other in B, Hkv, S_r; got key "
                         f"{tuple(key.shape)}, value {tuple(value.shape)}.")
    if Hq % key.shape[1]:
        raise ValueError(f"query heads must be a multiple of key/value heads (grouped-query attention); got "
                         f"{Hq} query heads and {key.shape[1]} key/value heads.")
    check_layout(layout)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None; got {scale!r}.")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return [B, Hq, key.shape[1], Lq, key.shape[2], D, value.shape[-1], _DTYPES.index(query.dtype), int(grad)]


_FIELDS = ("batch", "query heads", "key/value heads", None, None, "head dim", "value head dim", "dtype",
           "requires_grad (every rank runs the backward, or none)")


def _agree(metas: list[list[int]], layout: str) -> tuple[list, list, int, int]:
    """Check every rank's shapes against rank 0's and the layout; the segments of queries and keys."""
    P = len(metas)
    for r, m in enumerate(metas):
        for f, name in enumerate(_FIELDS):
            if name is not None and m[f] != metas[0][f]:
                show = (lambda x: _DTYPES[x]) if name == "dtype" else (lambda x: x)
                raise ValueError(f"ring_attention: every rank must pass the same {name}; rank {r} has "
                                 f"{show(m[f])}, rank 0 has {show(metas[0][f])} (shard shapes mismatch).")
    lq, lk = [m[3] for m in metas], [m[4] for m in metas]
    L, S = sum(lq), sum(lk)
    q_segs, k_segs = segments(layout, P, L, lq), segments(layout, P, S, lk)
    for name, got, segs in (("query", lq, q_segs), ("key", lk, k_segs)):
        want = [sum(n for _, n in sg) for sg in segs]
        if got != want:
            raise ValueError(f"ring_attention: the {layout} layout of {sum(got)} positions over {P} ranks gives "
                             f"{name} slices of {want} rows; the ranks hold {got}. Cut the sequence with "
                             f"attnkit.distributed.shard(x, rank, world_size, layout={layout!r}).")
    return q_segs, k_segs, L, S


def ring_attention(query: Tensor, key: Tensor, value: Tensor, *, mask: Mask | Tensor | None = None,
                   scale: float | None = None, group=None, layout: str = "contiguous",
                   return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a sequence sharded across the ranks of ``group``: this rank's slice of exactly what
    :func:`attnkit.functional.attention` gives on the whole sequence (scaled dot-product softmax).

    ``softmax(scale Q K^T + mask) V`` with ``Q`` the rank's queries and ``K``, ``V`` the whole sequence's keys and
    values, fetched from the other ranks only where ``mask`` lets this rank's queries see them.

    ======  =====================  ==============================================================
    symbol  argument               shape (this rank's part)
    ``Q``   ``query``              ``(B, Hq, L_r, D)``
    ``K``   ``key``                ``(B, Hkv, S_r, D)`` (``Hkv`` divides ``Hq``: grouped-query)
    ``V``   ``value``              ``(B, Hkv, S_r, Dv)``
    ======  =====================  ==============================================================

    Args:
        query, key, value: this rank's slices (see ``layout``); every rank of the group must call with the same
            ``B``, heads, head dims, dtype, ``mask`` and ``layout``, and must run the backward if one does.
        mask: an attnkit mask (or a boolean ``(L, S)`` tensor) on *global* positions of the ``L x S`` problem, as
            on one process; None = every pair.
        scale: multiplies ``Q K^T``; default ``1 / sqrt(D)``.
        group: the ``torch.distributed`` process group (default: the world).
        layout: ``"contiguous"`` (rank ``r`` holds the ``r``-th slice; ragged lengths allowed) or ``"zigzag"``
            (chunks ``r`` and ``2P - 1 - r`` of ``2P``: balanced work under a causal mask). Cut and rebuild
            tensors with :func:`attnkit.distributed.shard` / :func:`attnkit.distributed.unshard`.
        return_lse: also return the log-sum-exp of each query row (-inf for a row with no allowed key).

    Returns:
        ``out`` ``(B, Hq, L_r, Dv)``, and ``lse`` ``(B, Hq, L_r)`` when ``return_lse``.

    Raises:
        ValueError / TypeError on every rank when any rank's arguments are wrong or the ranks' shards do not fit
        together (the ranks exchange their shapes first, so a bad rank cannot leave the others waiting);
        RuntimeError when torch.distributed is not initialized. A rank that dies mid-call surfaces on the others
        as the backend's error (gloo: connection closed) or, at worst, at the process group's ``timeout``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs torch.distributed: call torch.distributed.init_process_group "
                           "first (torchrun sets the environment), or use attnkit.functional.attention.")
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    err, meta = None, [0] * len(_FIELDS)
    try:
        meta = _local_meta(query, key, value, layout, scale)
        mask = full() if mask is None else as_mask(mask)
    except (TypeError, ValueError) as e:
        err = e
    dev = query.device if isinstance(query, Tensor) else torch.device("cpu")
    mine = torch.tensor([int(err is not None), *meta], dtype=torch.int64, device=dev)
    every = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(every, mine, group=group)
    every = [t.tolist() for t in every]
    if any(m[0] for m in every):
        texts: list = [None] * P
        dist.all_gather_object(texts, None if err is None else f"{type(err).__name__}: {err}", group=group)
        bad = [r for r in range(P) if every[r][0]]
        if err is not None:
            raise err
        raise ValueError(f"ring_attention: rank {bad[0]} refused its arguments ({texts[bad[0]]}); every rank stops.")
    q_segs, k_segs, L, S = _agree([m[1:] for m in every], layout)
    B, Hq = meta[0], meta[1]
    mask.check((B, Hq, L, S))
    scale = 1.0 / math.sqrt(meta[5]) if scale is None else float(scale)
    ring = _Ring(group, Schedule(mask, q_segs, k_segs, L, S), rank, P, None)
    query, key, value, seen = _nonfinite.guard(query, key, value, mask, q_segs, k_segs, rank, L, S, group)
    # contiguous rows: the kernels gather rows of k and v (a strided view makes that ~30x slower)
    out, lse = _RingAttention.apply(query.contiguous(), key.contiguous(), value.contiguous(), ring, scale)
    if seen is not None:  # rows that may see a non-finite key or value: NaN, as the equation gives them
        out, lse = out.masked_fill(seen, float("nan")), lse.masked_fill(seen.squeeze(-1), float("nan"))
    return (out, lse) if return_lse else out
