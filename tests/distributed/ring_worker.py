"""One rank of the ring attention tests (started by test_ring.py with torchrun's environment variables).

Every rank builds the same random full problem (same seed), runs :func:`ring_attention` on its shard, and compares
its output and gradients with its shard of :func:`attnkit.functional.attention` on the whole sequence. Many cases
run inside one process group (a process start costs a torch import). Prints one line per case; exits non-zero on
the first failure, with the case in the message."""

from __future__ import annotations

import os
import sys
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from attnkit import masks
from attnkit.distributed import reset_traffic, ring_attention, shard, traffic
from attnkit.functional import attention

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _block_sparse(L: int, block: int, g: torch.Generator) -> torch.Tensor:
    tiles = torch.rand(-(-L // block), -(-L // block), generator=g) < 0.5
    tiles |= torch.eye(tiles.shape[0], dtype=torch.bool)
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:L, :L]  # (L, L)


def _mask_mod(b, h, q, k):
    return ((q - k) % 3 != 1) & ((h + b) % 2 == 0) | (q == k)


def cases(P: int):
    """(name, mask builder(L, B, g), layout, L, lengths, Hq, Hkv, dtype)."""
    out = []
    for dt in (torch.float32, torch.float64):
        n = 8 * P + 3  # ragged: not divisible by P nor 2P
        out += [
            ("full", lambda L, B, g: None, "contiguous", n, None, 4, 4, dt),
            ("causal", lambda L, B, g: masks.causal(), "contiguous", n, None, 4, 2, dt),
            ("causal-zigzag", lambda L, B, g: masks.causal(), "zigzag", n, None, 4, 4, dt),
            ("window-zigzag", lambda L, B, g: masks.window(3, 2), "zigzag", n + 1, None, 2, 1, dt),
            ("window-halo", lambda L, B, g: masks.window(3, 2), "contiguous", 8 * P, None, 4, 4, dt),
            ("window-wide", lambda L, B, g: masks.window(11, 0), "contiguous", n, None, 4, 1, dt),
            ("padding", lambda L, B, g: masks.padding(torch.randint(1, L, (B,), generator=g)), "contiguous", n,
             None, 2, 2, dt),
            ("documents&causal", lambda L, B, g: masks.documents([3, L - 9, 6]) & masks.causal(), "zigzag", n,
             None, 4, 2, dt),
            ("mask_mod", lambda L, B, g: masks.mask_mod(_mask_mod, B, 4), "contiguous", n, None, 4, 2, dt),
            ("block-sparse", lambda L, B, g: masks.dense(_block_sparse(L, 4, g)), "contiguous", n, None, 4, 4, dt),
            ("ragged-slices", lambda L, B, g: masks.window(None, 1) | masks.padding([5, 2]), "contiguous",
             None, [7] + [1] * (P - 2) + [12] if P > 2 else [13, 2], 4, 4, dt),
            ("empty-rows", lambda L, B, g: masks.padding([0, 3]) & masks.window(4, 4), "contiguous", n, None, 2, 2,
             dt),
        ]
    return out


def check_case(name, make_mask, layout, L, lengths, Hq, Hkv, dtype, rank, P):
    if lengths is not None:
        L = sum(lengths)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + L)  # the same on every rank
    B, D, Dv = 2, 8, 6
    q = torch.randn(B, Hq, L, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, L, Dv, generator=g, dtype=dtype)
    dout = torch.randn(B, Hq, L, Dv, generator=g, dtype=dtype)
    mask = make_mask(L, B, g)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*full, mask=mask)
    ref.backward(dout)
    part = [shard(t, rank, P, layout=layout, lengths=lengths).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*part, mask=mask, layout=layout)
    out.backward(shard(dout, rank, P, layout=layout, lengths=lengths))
    pairs = [("out", out, ref)] + [(f"d{n}", p.grad, f.grad) for n, p, f in zip("qkv", part, full, strict=True)]
    for what, got, want in pairs:
        want = shard(want, rank, P, layout=layout, lengths=lengths)
        err = (got - want).abs().max().item() if got.numel() else 0.0
        if not err <= TOL[dtype]:
            raise AssertionError(f"case {name} {dtype} P={P}: {what} differs by {err:.3g} (> {TOL[dtype]})")
    return float(ref.detach().abs().max())


def check_halo(rank, P):
    """window(3, 2) over slices of 8: each rank sends 3 rows forward and 2 backward (twice: forward and
    backward's re-send, plus the gradients back), whatever P."""
    B, H, D, L = 1, 2, 4, 8 * P
    x = [torch.randn(B, H, L, D, dtype=torch.float64).requires_grad_() for _ in range(3)]
    reset_traffic()
    out = ring_attention(*(shard(t.detach(), rank, P) for t in x), mask=masks.window(3, 2))
    sent = traffic()["bytes_sent"]
    rows = (3 if rank < P - 1 else 0) + (2 if rank > 0 else 0)
    want = rows * B * H * 2 * D * 8
    if sent != want:
        raise AssertionError(f"window halo P={P} rank {rank}: sent {sent} bytes, expected {want} ({rows} rows)")
    return out


def check_group(rank, P):
    """Two rings of two ranks side by side (``group=``): each equals attention on its own sequence."""
    if P != 4:
        return
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    mine, r = groups[rank // 2], rank % 2
    g = torch.Generator().manual_seed(100 + rank // 2)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=g, dtype=torch.float64) for _ in range(3))
    want = attention(q, k, v, mask=masks.causal())
    got = ring_attention(*(shard(t, r, 2) for t in (q, k, v)), mask=masks.causal(), group=mine)
    err = (got - shard(want, r, 2)).abs().max().item()
    if not err <= 1e-10:
        raise AssertionError(f"group= ring on rank {rank}: out differs by {err:.3g}")


def check_errors(rank, P):
    """A mismatched shard and a rank's bad argument raise on every rank (and the group stays usable)."""
    q = torch.randn(1, 2, 4, 8)
    bad_d = torch.randn(1, 2, 4, 8 if rank else 6)
    try:
        ring_attention(bad_d, bad_d, bad_d)
    except ValueError as e:
        assert "head dim" in str(e) and "rank" in str(e), str(e)
    else:
        raise AssertionError("a mismatched head dim was accepted")
    try:
        ring_attention(q if rank != P - 1 else q[0], q, q)
    except (ValueError, TypeError) as e:
        assert "4-D" in str(e), str(e)
    else:
        raise AssertionError("a 3-D query on one rank was accepted")
    try:  # one rank recording gradients and the other not would leave the backward waiting: refused
        ring_attention(q.clone().requires_grad_(rank == 0), q, q)
    except ValueError as e:
        assert "requires_grad" in str(e), str(e)
    else:
        raise AssertionError("ranks disagreeing on requires_grad were accepted")
    try:  # zigzag needs tensor_split chunks: rank 0 holding two rows more is refused everywhere
        ring_attention(*(torch.randn(1, 2, 4 + 2 * (rank == 0), 8) for _ in range(3)), layout="zigzag")
    except ValueError as e:
        assert "zigzag layout" in str(e), str(e)
    else:
        raise AssertionError("a zigzag shard of the wrong length was accepted")


def check_nonfinite(rank, P):
    """The single-process non-finite rule holds across ranks: a NaN/inf key or value reaches only the rows that may
    see it (NaN there, as attention() gives), never another row's output or any gradient; a NaN query row that
    sees no key poisons nothing. Compared with attention() on the whole sequence, NaNs in the same places."""
    B, Hq, Hkv, D, L = 2, 4, 2, 8, 8 * P + 3
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    k[0, 0, L - 2] = float("nan")  # seen only by the last two rows of batch 0, heads 0 and 1
    v[1, 1, 3] = float("inf")  # seen by the rows from 3 on (batch 1, heads 2 and 3)
    q[1, 0, L - 1] = float("nan")  # a row the mask leaves without keys

    def blind_last_row(b, h, qi, kj):
        return ~((b == 1) & (qi == L - 1))

    mask = masks.causal() & masks.padding([L, L - 1]) & masks.mask_mod(blind_last_row, B, Hq)
    dout = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*full, mask=mask)
    ref.backward(dout)
    part = [shard(t, rank, P).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*part, mask=mask)
    out.backward(shard(dout, rank, P))
    seen = torch.isnan(shard(ref.detach(), rank, P))
    if not seen.any() and rank == P - 1:
        raise AssertionError("the non-finite case makes no NaN row on the last rank: it tests nothing there")
    for what, got, want in [("out", out, ref)] + [(f"d{n}", p.grad, f.grad) for n, p, f in
                                                 zip("qkv", part, full, strict=True)]:
        want = shard(want.detach(), rank, P)
        torch.testing.assert_close(got.detach(), want, atol=1e-10, rtol=0, equal_nan=True,
                                   msg=lambda m, what=what: f"non-finite case P={P} rank {rank}: {what}: {m}")
    for n, p in zip("qkv", part, strict=True):  # gradients stay finite: no bad value reaches them
        if not torch.isfinite(p.grad).all():
            raise AssertionError(f"non-finite case P={P} rank {rank}: d{n} holds a NaN/inf")


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "equal"
    dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("RING_TIMEOUT", "60"))))
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if mode == "die":  # rank 1 leaves between the forward and the backward: rank 0's backward must fail
        x = [torch.randn(1, 1, 64, 8, requires_grad=True) for _ in range(3)]
        out = ring_attention(*x)
        if rank == 1:
            os._exit(3)
        out.sum().backward()
        return
    for c in cases(P):
        check_case(*c, rank, P)
    check_halo(rank, P)
    check_nonfinite(rank, P)
    check_group(rank, P)
    check_errors(rank, P)
    dist.barrier()
    print(f"rank {rank}: {len(cases(P))} cases ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
