"""Measure what a forward pass costs on the CPU: wall time and peak memory held by tensors.

Peak memory is counted by a ``TorchDispatchMode`` that sees every tensor an aten operator returns and follows
its storage until it is freed: the result is the largest number of bytes of tensor storage alive at once that
was allocated during the call (inputs and parameters, allocated before, are not counted). Scratch buffers that
a fused kernel allocates and frees inside one operator are not seen.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Context manager: ``with PeakTensorMemory() as m: f()`` then ``m.peak`` bytes (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.current = 0
        self.peak = 0

    def _collect(self) -> None:
        dead = [ref for ref in self.live if ref.expired()]
        for ref in dead:
            self.current -= self.live.pop(ref)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.live:
                    nbytes = t.untyped_storage().nbytes()
                    self.live[ref] = nbytes
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storage allocated and alive at once while ``fn()`` runs (its result included)."""
    with PeakTensorMemory() as m:
        result = fn()
    del result
    return m.peak


def time_call(fn: Callable[[], object], *, repeats: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
