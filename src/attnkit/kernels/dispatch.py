"""Backend selection for :func:`attnkit.functional.attention`: one ordered table of kernel files.

Each kernel file implements the contract of :mod:`attnkit.kernels._contract` (``supports``, ``suits``,
``run``). ``choose`` walks :data:`AUTO_ORDER` and takes the first kernel that supports the request and suits it;
``validate`` checks an explicitly named backend and says why it cannot serve (no silent fallback).

==============  ==========================================================================================
backend         serves
==============  ==========================================================================================
``graph``       dot-product softmax with a graph mask: attention along the edge list, O(E)
``native``      dot-product softmax with any mask: the compiled C++ tile kernel over the plan (CPU, if built)
``window``      dot-product softmax with a band mask (both widths finite), strided key views
``blocksparse`` dot-product softmax with any mask: only the non-empty tiles of the mask's plan
``banded``      dot-product softmax with a mask inside a band (``window & padding``) below 512 x 512 pairs
``tiled``       dot-product softmax with a ``score_mod`` and any mask, tile by tile (FlexAttention's model)
``sdpa``        dot-product softmax with no mask, full, causal, padding or dense masks (PyTorch's fused kernel)
``chunked``     any position-independent score callable and bias with softmax: online softmax over key chunks
``math``        everything (the plain reference; materializes ``(..., L, S)``)
==============  ==========================================================================================

``auto`` rules (each kernel's ``suits``): a graph mask goes to ``graph``; where the compiled kernel is built,
CPU masks whose plan keeps at most half of the tiles, from 256 x 256 pairs, to ``native``; a narrow window (at
most a quarter of the keys) from 256 x 256 pairs to ``window``; masks whose plan keeps at most 30 % of the
tiles, from 512 x 512 pairs, to ``blocksparse``; a mask inside a narrow band (not a plain window) below that, to
``banded``; a ``score_mod`` from 128 x 128 pairs to ``tiled``; otherwise ``sdpa`` when it can serve, ``chunked``
for other scores or biases from 512 x 512 pairs, else ``math``. Under ``torch.compile`` / ``torch.export``
tracing only ``sdpa`` and ``math`` are chosen (no data-dependent branch).
"""

from __future__ import annotations

from attnkit.kernels import banded, blocksparse, chunked, graph, math, native, sdpa, tiled, window
from attnkit.masks._base import tracing

BACKENDS = {"graph": graph, "native": native, "window": window, "blocksparse": blocksparse, "banded": banded,
            "tiled": tiled, "sdpa": sdpa, "chunked": chunked, "math": math}
AUTO_ORDER = ("graph", "native", "window", "blocksparse", "banded", "tiled", "sdpa", "chunked", "math")
TRACEABLE = ("sdpa", "math")


_tracing = tracing


def choose(query, key, value, **request) -> str:
    """Name of the backend ``backend="auto"`` uses for this request (see the module docstring)."""
    order = TRACEABLE if _tracing() else AUTO_ORDER
    for name in order:
        kernel = BACKENDS[name]
        if kernel.supports(query, key, value, **request) is None and kernel.suits(query, key, value, **request):
            return name
    return "math"


def validate(name: str, query, key, value, **request) -> str:
    """Return ``name`` if that backend can serve the request; raise ``ValueError`` saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}; got {name!r}.")
    reason = BACKENDS[name].supports(query, key, value, **request)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this request: {reason}.")
    return name


def run(name: str, query, key, value, **request):
    """Run backend ``name``: ``(out, weights | None, lse | None)``."""
    return BACKENDS[name].run(query, key, value, **request)


def run_checked(name: str, query, key, value, **request):
    """Run backend ``name`` on inputs the non-finite guard has not seen, where it checks them itself as it reads
    them (``run_checked`` in its file): ``(out, weights | None, lse | None)``, or None where it cannot vouch for
    them (a NaN or an inf in a row it read, or no such check), and the caller guards and calls :func:`run`."""
    checked = getattr(BACKENDS[name], "run_checked", None)
    return None if checked is None else checked(query, key, value, **request)
