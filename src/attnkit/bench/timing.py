"""Timing and memory measurement for ``attnkit bench``.

* Time: the implementations of one case run *interleaved* (round-robin: a, b, c, a, b, c, ...) so that a
  change in machine load hits all of them alike, and each reports the median of its repeats and the round of
  each sample (the targets compare two implementations by the median of their per-round ratios). The first call of
  each is a warm-up and is not counted, except for calls slower than ``slow_s`` (then the first call is the
  one sample: a multi-second call is not dominated by first-call costs, and repeating it would take minutes).
* Peak memory: ``tracemalloc`` does not see torch's allocations, so each measured call runs in a fresh
  child process (``multiprocessing`` spawn): after the inputs are built the child resets its resident-set
  high-water mark (``/proc/self/clear_refs``), runs the call, and reports ``VmHWM`` (``/proc/self/status``)
  minus its resident set just before the call. This counts everything the call allocates, including
  allocator slack (Linux only; elsewhere ``ru_maxrss``, which also counts the setup, is used).
* Machine peak: the best of a few 2048 x 2048 float32 matmuls with the same thread count, in GFLOP/s.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(fns: dict[str, Callable[[], object]], *, repeats: int, slow_s: float = 5.0,
                        budget_s: float = 20.0) -> dict[str, dict]:
    """Median wall time of each function, run round-robin. Returns ``{name: {"median_s", "n", "times",
    "rounds"}}``: ``rounds[i]`` is the round in which ``times[i]`` was taken (-1 for a slow call's first call), so
    samples of two implementations from the same round, taken back to back, can be compared pairwise."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds: dict[str, list[int]] = {name: [] for name in fns}
    wanted: dict[str, int] = {}
    for name, fn in fns.items():  # warm-up (or first sample for slow calls)
        t = _timed(fn)
        if t > slow_s:
            samples[name].append(t)
            rounds[name].append(-1)
            wanted[name] = max(1, min(repeats, int(budget_s // t)))
        else:
            wanted[name] = repeats
    for r in range(max(wanted.values(), default=0)):
        for name, fn in fns.items():
            if len(samples[name]) < wanted[name]:
                samples[name].append(_timed(fn))
                rounds[name].append(r)
    return {name: {"median_s": statistics.median(ts), "n": len(ts), "times": ts, "rounds": rounds[name]}
            for name, ts in samples.items()}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n float32 matmul with ``threads`` threads (the machine's practical peak)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _high_water() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _child_peak(case_id: str, impl: str, quick: bool, threads: int, queue) -> None:
    try:
        torch.set_num_threads(threads)
        from attnkit.bench.cases import find_case

        fn = find_case(case_id, quick).impls[impl]()
        reset = _reset_high_water()
        before = rss_bytes()
        fn()
        peak = _high_water() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        queue.put(("ok", max(0, peak - before)))
    except BaseException as exc:  # report the failure to the parent instead of hanging it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def peak_memory_bytes(case_id: str, impl: str, *, quick: bool, threads: int, timeout_s: float = 600.0):
    """Peak extra resident memory of one call, measured in a fresh child process; ``(bytes | None, note)``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak, args=(case_id, impl, quick, threads, queue))
    proc.start()
    import queue as _queue

    status, value = "error", "timed out"
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            status, value = queue.get(timeout=0.5)
            break
        except _queue.Empty:
            if not proc.is_alive() and queue.empty():  # died without a result (e.g. out of memory)
                status, value = "error", f"no result (child exit code {proc.exitcode})"
                break
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    return (value, "") if status == "ok" else (None, value)
