"""Ring attention on 2 and 4 gloo processes on this machine (loopback only), against
:func:`attnkit.functional.attention` on the whole sequence: outputs and gradients to 1e-5 (float32) / 1e-10
(float64), every mask kind, GQA, ragged slices, contiguous and zigzag layouts (ring_worker.py holds the cases).
Every process runs under a hard timeout and the process group under a short one, so a failing rank ends the test
instead of hanging it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit import masks
from attnkit.distributed import segments, shard, unshard
from attnkit.distributed.schedule import Schedule

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(P: int, mode: str, timeout: float, group_timeout: int = 60) -> list[tuple[int, str]]:
    """Start ``P`` ranks of ring_worker.py with torchrun's variables; ``(return code, output)`` per rank."""
    port = _free_port()
    procs = []
    for r in range(P):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(P),
                   LOCAL_RANK=str(r), OMP_NUM_THREADS="1", RING_TIMEOUT=str(group_timeout),
                   PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "ring_worker.py"), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.parametrize("P", [2, 4])
def test_ring_equals_whole_sequence_attention(P):
    results = launch(P, "equal", timeout=150)
    for r, (rc, out) in enumerate(results):
        assert rc == 0, f"rank {r} of {P} failed:\n{out[-3000:]}"
        assert "cases ok" in out


def test_a_rank_that_dies_fails_the_others_instead_of_hanging():
    results = launch(2, "die", timeout=60, group_timeout=30)
    assert results[1][0] == 3
    rc, out = results[0]
    assert rc != 0 and "RuntimeError" in out, out[-2000:]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("n,P", [(17, 2), (16, 4), (5, 4), (3, 2)])
def test_shard_unshard_round_trip(layout, n, P):
    x = torch.arange(2 * n).view(1, 2, n, 1)
    parts = [shard(x, r, P, layout=layout) for r in range(P)]
    assert sum(p.shape[-2] for p in parts) == n
    assert torch.equal(unshard(parts, layout=layout), x)


def test_zigzag_balances_causal_work():
    """Zigzag: every rank's causal block count within one chunk's worth of each other; contiguous: not."""
    P, n = 4, 64
    work = {}
    for layout in ("contiguous", "zigzag"):
        segs = segments(layout, P, n)
        sched = Schedule(masks.causal(), segs, segs, n, n)
        work[layout] = [sum(nq * nk for o in range(P) for _, _, nq, _, _, nk in sched.blocks(d, o, d == o))
                        for d in range(P)]
    assert max(work["zigzag"]) - min(work["zigzag"]) <= (n // (2 * P)) ** 2
    assert max(work["contiguous"]) > 3 * min(work["contiguous"])


def test_window_needs_only_the_halos():
    """window(3, 2) over slices of 16: rank r needs 3 rows of r - 1, 2 rows of r + 1, nothing else."""
    P, n = 4, 64
    segs = segments("contiguous", P, n)
    sched = Schedule(masks.window(3, 2), segs, segs, n, n)
    for d in range(P):
        for o in range(P):
            want = 3 if o == d - 1 else 2 if o == d + 1 else 16 if o == d else 0
            assert sched.rows(o, d) == want, (o, d)


def test_causal_sends_no_key_backwards_and_documents_stay_home():
    """Contiguous causal: rank o's keys go only to ranks after it. Documents ending on slice boundaries: no
    transfer at all. A mask_mod's empty blocks are skipped the same way (planned from index intervals)."""
    P, n = 4, 64
    segs = segments("contiguous", P, n)
    causal = Schedule(masks.causal(), segs, segs, n, n)
    docs = Schedule(masks.documents([16, 16, 16, 16]), segs, segs, n, n)
    same_quarter = Schedule(masks.mask_mod(lambda b, h, q, k: q // 16 == k // 16), segs, segs, n, n)
    for d in range(P):
        for o in range(P):
            assert causal.rows(o, d) == (16 if o <= d else 0), (o, d)
            assert docs.rows(o, d) == same_quarter.rows(o, d) == (16 if o == d else 0), (o, d)
