"""Benchmark cases of the compiled CPU tile kernel (issue 16): ``backend="native"`` against the pure-PyTorch
kernels it replaces, dense SDPA and FlexAttention compiled, implementations interleaved in one process.

float32, B=1, H=8, D=64 (``--quick`` shrinks them). Rates are the *needed* work (allowed pairs only, see
:mod:`attnkit.bench.cases`); a case that compares with dense SDPA at L=4096 times it as one more implementation
(``sdpa_dense_L4096``, its own work in ``extra["dense_flops"]``), so both rates come from the same rounds.

* ``native-window128-L16384-{fwd,fwd+bwd}``: ``masks.window(128, 128)``; ``window`` = the pure-PyTorch band
  kernel, ``flex`` = FlexAttention compiled on the same mask (forward; compile time apart);
* ``dense-L4096-fwd+bwd``: attnkit without a mask (SDPA) against SDPA;
* ``native-blocksparse10-L8192-{fwd,fwd+bwd}``: the bench's random 10 % of 128 x 128 tiles against dense SDPA
  (no mask) and the pure-PyTorch block-sparse kernel;
* ``native-docs16-causal-L16384-{fwd,fwd+bwd}`` and ``native-slidingmod128-L16384-{fwd,fwd+bwd}``: ``mask_mod``
  masks against FlexAttention compiled (forward; it refuses backward on a CPU) and the pure-PyTorch kernels;
* ``native-busy-window128-L8192-fwd``: window and dense SDPA (L=4096), each alone and with one busy process on
  the machine (a spinning child the bench starts, running only while a ``*_busy`` implementation is timed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import weakref

import torch
import torch.nn.functional as F

from attnkit import masks
from attnkit.bench import anchors
from attnkit.bench.anchors import _qkv, _runner
from attnkit.bench.cases_flex import _NO_CPU_BWD, _refused, documents_causal, sliding
from attnkit.functional.attention import attention

_BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(100000))\n"


class BusyProcess:
    """One CPU-bound child process, stopped (SIGSTOP) except while :meth:`wrap`'s calls run (SIGCONT)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _BUSY], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.kill(self.proc.pid, signal.SIGSTOP)
        weakref.finalize(self, _kill, self.proc)

    def wrap(self, fn):
        def run():
            os.kill(self.proc.pid, signal.SIGCONT)
            try:
                return fn()
            finally:
                os.kill(self.proc.pid, signal.SIGSTOP)
        return run


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


_busy: list[BusyProcess] = []


def _busy_process() -> BusyProcess:
    if not _busy:
        _busy.append(BusyProcess())
    return _busy[0]


def _attn(B, H, L, D, mode, mask, backend, busy=False):
    def make():
        q, k, v = _qkv(B, H, L, L, D, grad=mode != "fwd")
        run = _runner(lambda a, b, c: attention(a, b, c, mask=mask, backend=backend), [q, k, v], mode)
        return _busy_process().wrap(run) if busy else run
    return make


def _sdpa(B, H, L, D, mode, busy=False):
    def make():
        q, k, v = _qkv(B, H, L, L, D, grad=mode != "fwd")
        run = _runner(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), [q, k, v], mode)
        return _busy_process().wrap(run) if busy else run
    return make


def native_cases(quick: bool, *, with_flex: bool = True):
    """The issue-16 cases (see the module docstring)."""
    from attnkit.bench.cases import Case, _pairs

    B, H, D = (1, 2, 16) if quick else (1, 8, 64)
    fb = {"fwd": 1, "fwd+bwd": 3}
    flex_here = with_flex and not quick
    out = []

    def work(pairs, mode):
        return 4.0 * B * H * pairs * D * fb[mode]

    w = 32 if quick else 128
    Lw, Ld = (1024, 256) if quick else (16384, 4096)
    win = masks.window(w, w)
    for mode in ("fwd", "fwd+bwd"):
        cid = f"native-window{w}-L{Lw}-{mode}"
        impls = {"native": _attn(B, H, Lw, D, mode, win, "native"), "window": _attn(B, H, Lw, D, mode, win, "window"),
                 f"sdpa_dense_L{Ld}": _sdpa(B, H, Ld, D, mode)}
        if flex_here and mode == "fwd":
            impls["flex"] = anchors.flex_factory(cid, B, H, Lw, D, anchors.window_mask_mod(w))
        out.append(Case(cid, f"native-window{w}-{mode}", Lw, mode, impls, work(_pairs(win, Lw, Lw), mode), "native",
                        role=f"native_window_{'fwd' if mode == 'fwd' else 'fwdbwd'}",
                        extra={"dense_flops": work(Ld * Ld, mode), "dense": f"sdpa_dense_L{Ld}"},
                        note=f"window = pure-PyTorch band kernel; sdpa_dense_L{Ld} = SDPA without a mask at L={Ld}"))
    out.append(Case(f"dense-L{Ld}-fwd+bwd", "dense-fwd+bwd", Ld, "fwd+bwd", {
        "attnkit": _attn(B, H, Ld, D, "fwd+bwd", None, "auto"), "sdpa": _sdpa(B, H, Ld, D, "fwd+bwd")},
        work(Ld * Ld, "fwd+bwd"), "sdpa", role="dense_fwdbwd"))

    Lb = 1024 if quick else 8192
    g = torch.Generator().manual_seed(0)  # the tiles of the bench's blocksparse10 cases
    nt = Lb // 128
    tiles = torch.rand(nt, nt, generator=g) < 0.1
    tiles[0, 0] = True
    bmask = masks.dense(tiles.repeat_interleave(128, 0).repeat_interleave(128, 1))
    for mode in ("fwd", "fwd+bwd"):
        out.append(Case(f"native-blocksparse10-L{Lb}-{mode}", f"native-blocksparse10-{mode}", Lb, mode, {
            "native": _attn(B, H, Lb, D, mode, bmask, "native"),
            "blocksparse": _attn(B, H, Lb, D, mode, bmask, "blocksparse"),
            "sdpa_nomask": _sdpa(B, H, Lb, D, mode)}, work(int(tiles.sum()) * 128 * 128, mode), "native",
            role=f"native_blocksparse_{'fwd' if mode == 'fwd' else 'fwdbwd'}",
            note=f"{int(tiles.sum())} of {nt * nt} tiles; sdpa_nomask = dense; blocksparse = pure-PyTorch kernel"))

    Lm = 1024 if quick else 16384
    ndoc = 16
    doc_mod = documents_causal(torch.arange(Lm) * ndoc // Lm)
    mods = {f"docs{ndoc}-causal": (doc_mod, ndoc * (Lm // ndoc) * (Lm // ndoc + 1) // 2, "blocksparse", "docs"),
            f"slidingmod{w}": (sliding(w), _pairs(win, Lm, Lm), "blocksparse", "slidingmod")}
    for name, (mod, pairs, pure, tag) in mods.items():
        mask = masks.mask_mod(mod)
        for mode in ("fwd", "fwd+bwd"):
            cid = f"native-{name}-L{Lm}-{mode}"
            impls = {"native": _attn(B, H, Lm, D, mode, mask, "native"), pure: _attn(B, H, Lm, D, mode, mask, pure)}
            if flex_here:
                impls["flex"] = (anchors.flex_factory(cid, B, H, Lm, D, mod) if mode == "fwd"
                                 else _refused(_NO_CPU_BWD))
            out.append(Case(cid, f"native-{name}-{mode}", Lm, mode, impls, work(pairs, mode), "native",
                            role=f"native_{tag}_{'fwd' if mode == 'fwd' else 'fwdbwd'}",
                            note="attention(mask=masks.mask_mod(...)); flex = FlexAttention compiled, same mod"))

    Lc = 1024 if quick else 8192
    out.append(Case(f"native-busy-window{w}-L{Lc}-fwd", "native-busy", Lc, "fwd", {
        "native": _attn(B, H, Lc, D, "fwd", win, "native"),
        "native_busy": _attn(B, H, Lc, D, "fwd", win, "native", busy=True),
        "sdpa": _sdpa(B, H, Ld, D, "fwd"), "sdpa_busy": _sdpa(B, H, Ld, D, "fwd", busy=True)}, None, "native",
        role="native_busy",
        note=f"*_busy: one spinning process beside the call (started by the bench); sdpa = dense at L={Ld}"))
    return out
