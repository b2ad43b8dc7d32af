"""Ring attention on P = 1, 2, 4 processes of this machine (gloo on loopback): per-rank peak memory, bytes sent per
rank and time per step (forward + backward), for a window and a causal mask.

    python -m attnkit.distributed.bench                 # the README's table (a few minutes on 2 cores)
    python -m attnkit.distributed.bench --quick         # small sizes, a smoke run

Peak memory is the rank's peak RSS minus its RSS after importing torch and joining the group (the peak count is
restarted there, Linux's ``clear_refs``), at fixed B, H, D, so it counts what the steps allocate. All ranks share
this machine's cores: the time per step shows the work a rank does and the cost of the exchange, not what P
machines would take (the README's model does that). The time is the slowest rank's (a barrier ends each step);
the work balance counts the pairs in each rank's non-empty tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

CASES = {  # name: (mask, layout, L)
    "window128": ("window", "contiguous", 65536),
    "causal": ("causal", "contiguous", 4096),
    "causal-zigzag": ("causal", "zigzag", 4096),
}
B, H, D = 1, 4, 64


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> float:
    """Restart the peak-RSS count from the current RSS (``clear_refs`` 5: Linux >= 4.0); the current RSS. The
    import's transient peak would otherwise hide everything a small step allocates."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def worker(case: str, L: int, steps: int, out: str) -> None:
    """One rank (environment from the launcher): run ``steps`` forward+backward steps, write its figures."""
    import torch
    import torch.distributed as dist

    from attnkit import masks
    from attnkit.distributed import reset_traffic, ring_attention, segments, traffic

    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, P = dist.get_rank(), dist.get_world_size()
    kind, layout, _ = CASES[case]
    mask = masks.window(128, 0) if kind == "window" else masks.causal()
    base = _reset_peak()
    n = sum(m for _, m in segments(layout, P, L)[rank])
    g = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(B, H, n, D, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    times = []
    for s in range(steps + 1):
        reset_traffic()
        dist.barrier()
        t0 = time.perf_counter()
        ring_attention(q, k, v, mask=mask, layout=layout).backward(dout)
        dist.barrier()
        if s:  # the first step warms up (plans, allocator)
            times.append(time.perf_counter() - t0)
        for t in (q, k, v):
            t.grad = None
    sent = traffic()["bytes_sent"]
    with open(out, "w") as f:
        json.dump({"rank": rank, "peak_mib": _status_mib("VmHWM") - base, "sent": sent, "rows": n,
                   "seconds": sorted(times)[len(times) // 2]}, f)
    dist.destroy_process_group()


def work_balance(case: str, L: int, P: int) -> float:
    """Largest over smallest rank's work: the pairs in the non-empty tiles of its query rows (the schedule's)."""
    from attnkit import masks
    from attnkit.distributed import segments
    from attnkit.distributed.schedule import Schedule

    kind, layout, _ = CASES[case]
    mask = masks.window(128, 0) if kind == "window" else masks.causal()
    segs = segments(layout, P, L)
    sched = Schedule(mask, segs, segs, L, L)
    T, per_row = sched.tile, sched.tiles.sum(1)  # (nq,): non-empty tiles in each row of tiles
    work = [sum(int(per_row[s // T:(s + n - 1) // T + 1].sum()) for s, n in segs[r] if n) for r in range(P)]
    return max(work) / max(min(work), 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: str, L: int, P: int, steps: int, timeout: float) -> list[dict]:
    """Run ``case`` on ``P`` local processes; each rank's figures."""
    port, tmp = _free_port(), tempfile.mkdtemp(prefix="attnkit-ring-bench-")
    threads = str(max(1, (os.cpu_count() or 1) // P))
    procs = []
    for r in range(P):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(P),
                   OMP_NUM_THREADS=threads)
        cmd = [sys.executable, "-m", "attnkit.distributed.bench", "--worker", case, "--length", str(L),
               "--steps", str(steps), "--out", os.path.join(tmp, f"{r}.json")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, o) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode:
            raise RuntimeError(f"{case} P={P}: rank {r} failed:\n{o[-2000:]}")
    res = []
    for r in range(P):
        with open(os.path.join(tmp, f"{r}.json")) as f:
            res.append(json.load(f))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnkit.distributed.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--procs", default="1,2,4", help="process counts (default 1,2,4)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"cases among {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run, after one warm-up (default 2)")
    ap.add_argument("--quick", action="store_true", help="lengths / 8 (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.length, args.steps, args.out)
        return 0
    procs = [int(p) for p in args.procs.split(",")]
    cases = args.cases.split(",")
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--cases: unknown {bad}; choose among {list(CASES)}")
    rows = []
    for case in cases:
        L = CASES[case][2] // (8 if args.quick else 1)
        for P in procs:
            res = launch(case, L, P, args.steps, timeout=600)
            rows.append({"case": case, "L": L, "P": P,
                         "peak_mib_max": round(max(r["peak_mib"] for r in res), 1),
                         "sent_mib_max": round(max(r["sent"] for r in res) / 2**20, 3),
                         "sent_mib_mean": round(sum(r["sent"] for r in res) / P / 2**20, 3),
                         "step_s": round(max(r["seconds"] for r in res), 3),
                         "work_max_over_min": round(work_balance(case, L, P), 2)})
            sys.stdout.write(json.dumps(rows[-1]) + "\n" if args.json else "")
    if not args.json:
        print(f"ring attention, B={B} H={H} D={D} float32, forward + backward; {os.cpu_count()} cores shared by "
              "all ranks")
        print("| case | L | P | peak MiB / rank (max) | sent MiB / rank (max, mean) | s / step | work per rank, "
              "max / min |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['L']} | {r['P']} | {r['peak_mib_max']} | {r['sent_mib_max']}, "
                  f"{r['sent_mib_mean']} | {r['step_s']} | {r['work_max_over_min']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
