"""The :class:`Mask` contract: a mask answers its own questions, so no other file tests mask types.

Every question a kernel or :func:`attnkit.functional.attention` asks goes through one of these methods:

=================================  =====================================================================
``materialize(L, S)``              the dense boolean ``(L, S)`` / ``(B, 1.., L, S)`` tensor (small inputs, SDPA)
``allowed(qi, kj, L, S, nd)``      "may query ``qi`` see key ``kj``" on gathered index tiles (kernels)
``tile_states(q0, q1, k0, k1)``    per tile: 0 empty, 1 partial (or unknown), 2 full, for index intervals
``plan(L, S, block)``              the :class:`~attnkit.masks.BlockMask` of non-empty tiles (cached)
``unused_keys(L, S, nd, device)``  keys no query may see (their NaN/inf must not leak), or None
``check(scores_shape)``            ValueError if the mask cannot apply to scores of that shape
``window()``                       ``(left, right)`` if the mask is exactly a bottom-right band, else None
``edges(N)``                       the ``(2, E)`` edge list if the mask is a graph, else None
``is_full``                        every pair allowed
=================================  =====================================================================

All indices are *global* positions of the problem with ``L`` queries and ``S`` keys; a shard of it (ring
attention, a KV cache) is an :class:`Offset` of the mask, so it means the same on every shard. A user-defined
subclass implements ``allowed`` (and, for speed, ``tile_states``) and gets the sparse kernels.

Derived values (tiles, plans, the unused keys) are kept in the mask's own ``_derived`` store, keyed by the
identity and version of its tensors, so an in-place edit (``t[0] = False``, ``t.data``, NumPy views share the
version counter only through torch ops: call :meth:`Mask.forget` after editing through NumPy) rebuilds them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._checks import check_int

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile states


class Mask:
    """Base class of attnkit masks (True = may attend). Subclasses implement :meth:`allowed` or
    :meth:`materialize` (each has a default written with the other) and may override the rest."""

    #: True when the mask differs between batch elements (its materialized form has a leading ``B``).
    batched: bool = False

    # ---- the two ways to evaluate a mask -----------------------------------------------------------------

    def materialize(self, L: int, S: int, *, device=None, batch_ndim: int = 1) -> Tensor:
        """Dense boolean tensor, True = may attend.

        Shape:
            ``(L, S)`` for unbatched masks; ``(B, *[1] * (batch_ndim - 1), L, S)`` for batched ones.
        """
        qi = torch.arange(L, device=device).view(1, L, 1)  # (1, L, 1): one tile holding every query
        kj = torch.arange(S, device=device).view(1, 1, S)  # (1, 1, S)
        m = self.allowed(qi, kj, L, S, batch_ndim)  # (*mb, 1, L, S)
        m = m.squeeze(-3)
        return torch.broadcast_to(m, (*m.shape[:-2], L, S)) if m.ndim > 2 else m.expand(L, S)

    def allowed(self, qi: Tensor, kj: Tensor, L: int, S: int, batch_ndim: int) -> Tensor:
        """Boolean "may attend" for query indices ``qi`` and key indices ``kj`` inside ``[0, L)`` / ``[0, S)``.

        Shape:
            qi ``(G, R, 1)``, kj ``(G, 1, C)`` -> ``(*mb, G, R, C)`` (broadcastable), ``*mb`` empty or
            ``batch_ndim`` dims that broadcast against the scores' batch dims.
        """
        t = self.materialize(L, S, device=qi.device, batch_ndim=batch_ndim)
        t = t.expand(*t.shape[:-2], L, S) if t.ndim >= 2 else t.expand(L, S)
        return t[..., qi, kj]  # (..., G, R, C)

    # ---- structure --------------------------------------------------------------------------------------

    def tile_states(self, q0: Tensor, q1: Tensor, k0: Tensor, k1: Tensor, L: int, S: int) -> Tensor:
        """Classify tiles ``[q0, q1] x [k0, k1]`` (inclusive, global indices) over every batch element:
        0 = no pair allowed, 2 = every pair allowed, 1 = partial *or unknown* (the planner then evaluates
        :meth:`allowed` on that tile). The default knows nothing: every tile is 1.

        Shape:
            q0, q1 ``(nq,)``, k0, k1 ``(nk,)`` -> int8 ``(nq, nk)``.
        """
        return torch.ones(q0.shape[0], k0.shape[0], dtype=torch.int8, device=q0.device)

    def plan(self, L: int, S: int, block: int | tuple[int, int] = 128, *, batch_ndim: int = 2, device=None):
        """The :class:`~attnkit.masks.BlockMask` of this mask on ``L x S`` with ``block``-sized tiles, built once
        and remembered until a tensor of the mask changes."""
        from attnkit.masks._plan import build_plan

        bq, bk = block_sizes(block)
        key = ("plan", L, S, bq, bk, batch_ndim, str(device))
        return self.remember(key, lambda: build_plan(self, L, S, (bq, bk), batch_ndim, device))

    def block_mask(self, L: int, S: int, block: int | tuple[int, int] = 128, *, device=None) -> Tensor:
        """Which tiles hold at least one allowed pair (union over the batch), exact: the tiles
        :meth:`tile_states` cannot classify are evaluated. Shape ``(nq, nk)`` bool."""
        from attnkit.masks._plan import nonempty_tiles

        bq, bk = block_sizes(block)
        return self.remember(("tiles", L, S, bq, bk, str(device)), lambda: nonempty_tiles(self, L, S, bq, bk, device))

    def unused_keys(self, L: int, S: int, batch_ndim: int, device=None) -> Tensor | None:
        """Keys no query may attend, ``(..., S, 1)`` (broadcasts against keys), or None when unknown / none."""
        return None

    def check(self, scores_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if the mask cannot apply to scores of ``scores_shape`` (nothing materialized)."""

    def window(self) -> tuple[int, int] | None:
        """``(left, right)`` when the mask is exactly ``shift + i - left <= j <= shift + i + right`` with finite
        widths and ``shift = S - L`` (bottom-right), else None. The window kernel serves such masks."""
        return None

    def band(self) -> tuple[int, int] | None:
        """``(left, right)`` such that every allowed pair lies in the bottom-right band ``i' - left <= j <= i' +
        right`` (``i' = i + S - L``): a bound, not the mask (``window(16, 16) & padding(n)`` is within the band
        ``(16, 16)``), or None when no finite band bounds it."""
        return None

    def edges(self, N: int) -> Tensor | None:
        """The ``(2, E)`` edge list (row 0 source = key, row 1 target = query) if the mask is a graph."""
        return None

    @property
    def is_full(self) -> bool:
        """Every pair allowed (no tile can be skipped)."""
        return False

    @property
    def is_causal(self) -> bool:
        """Exactly bottom-right causal (``j <= i + S - L``), which SDPA's ``is_causal`` serves when ``L == S``."""
        return False

    # ---- algebra ----------------------------------------------------------------------------------------

    def __and__(self, other: Mask | Tensor) -> Mask:
        from attnkit.masks._structured import And, as_mask
        return And(self, as_mask(other))

    def __rand__(self, other: Tensor) -> Mask:
        from attnkit.masks._structured import And, as_mask
        return And(as_mask(other), self)

    def __or__(self, other: Mask | Tensor) -> Mask:
        from attnkit.masks._structured import Or, as_mask
        return Or(self, as_mask(other))

    def __ror__(self, other: Tensor) -> Mask:
        from attnkit.masks._structured import Or, as_mask
        return Or(as_mask(other), self)

    def __invert__(self) -> Mask:
        from attnkit.masks._structured import Not
        return Not(self)

    def offset(self, q_offset: int, k_offset: int, *, L: int, S: int) -> Mask:
        """This mask seen from a shard: local query ``i`` is global ``q_offset + i`` of ``L`` queries, local key
        ``j`` is global ``k_offset + j`` of ``S`` keys (ring attention slices, KV caches)."""
        from attnkit.masks._structured import Offset
        return Offset(self, q_offset, k_offset, L, S)

    # ---- derived values ---------------------------------------------------------------------------------

    def remember(self, key: tuple, build, keep=None):
        """``build()``, kept in this mask's ``_derived`` store under ``key`` and the identity and version of
        every tensor of the mask (an in-place edit bumps the version; a replaced tensor has another identity).
        With ``keep``, a value is kept only if ``keep(value)``."""
        tensors: list[Tensor] = []
        full_key = (key, self.fingerprint(tensors))
        store = self.__dict__.get("_derived") if hasattr(self, "__dict__") else None
        if store is not None and full_key in store:
            return store[full_key][1]
        value = build()
        if keep is not None and not keep(value):
            return value
        if hasattr(self, "__dict__"):
            store = self.__dict__.setdefault("_derived", {})
            if len(store) >= 8:  # the last few shapes only
                store.pop(next(iter(store)))
            store[full_key] = (tensors, value)  # holding the tensors keeps their ids from being reused
        return value

    def forget(self) -> None:
        """Drop every derived value (call after editing the mask's tensors through NumPy or ``.data``)."""
        if hasattr(self, "__dict__"):
            self.__dict__.pop("_derived", None)

    def fingerprint(self, tensors: list[Tensor]) -> tuple:
        """Hashable description of the mask's contents: its tensors by identity and version, other attributes
        by value (callables by identity). Composite masks include their parts."""
        out: list = [type(self).__name__]
        for name, val in sorted(vars(self).items()) if hasattr(self, "__dict__") else ():
            if name == "_derived":
                continue
            if isinstance(val, Mask):
                out.append((name, val.fingerprint(tensors)))
            elif isinstance(val, Tensor):
                tensors.append(val)
                out.append((name, id(val), val._version))
            elif isinstance(val, (int, float, str, bool, type(None))):
                out.append((name, val))
            elif isinstance(val, tuple) and all(isinstance(v, (int, float, str, bool, type(None))) for v in val):
                out.append((name, val))
            else:  # callables and other objects: identity only
                out.append((name, id(val)))
        return tuple(out)


def tracing() -> bool:
    """True under ``torch.compile`` / ``torch.export`` tracing (no data-dependent Python branch may run)."""
    return torch.compiler.is_compiling() or bool(getattr(torch.compiler, "is_exporting", lambda: False)())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_sizes(block: int | tuple[int, int]) -> tuple[int, int]:
    """``(bq, bk)`` from an int or a pair, validated."""
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if not (isinstance(block, tuple) and len(block) == 2):
        raise TypeError(f"block must be an int or a pair of ints (query rows, key columns); got {block!r}.")
    bq, bk = block
    check_int("block", bq, minimum=1)
    check_int("block", bk, minimum=1)
    return bq, bk


def tile_bounds(n: int, size: int, offset: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """First and last index (inclusive, shifted by ``offset``) of each ``size`` tile of ``[0, n)``: (nt,), (nt,)."""
    lo = torch.arange(cdiv(n, size), device=device) * size
    hi = torch.clamp(lo + size, max=n) - 1
    return lo + offset, hi + offset


def states_of(allowed_any: Tensor, allowed_all: Tensor) -> Tensor:
    """Tile states from "some pair allowed" and "every pair allowed" booleans (same shape): int8."""
    return allowed_any.to(torch.int8) + allowed_all.to(torch.int8)


def range_min_max(x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum and maximum of ``x[..., lo[t] : hi[t] + 1]`` for every interval ``t`` (a sparse table: O(N log N)
    to build, O(1) per interval). ``lo``/``hi`` are clamped into ``[0, N)``.

    Shape:
        x ``(..., N)``, lo/hi ``(T,)`` -> ``(..., T)``, ``(..., T)``.
    """
    N = x.shape[-1]
    lo = lo.clamp(0, max(N - 1, 0))
    hi = hi.clamp(0, max(N - 1, 0)).maximum(lo)
    mins, maxs = [x], [x]
    step = 1
    while 2 * step <= N:
        a, b = mins[-1], maxs[-1]
        mins.append(torch.minimum(a[..., :-step], a[..., step:]))
        maxs.append(torch.maximum(b[..., :-step], b[..., step:]))
        step *= 2
    span = hi - lo + 1
    level = torch.floor(torch.log2(span.double())).long().clamp(min=0)  # (T,)
    out_min = torch.empty(*x.shape[:-1], lo.shape[0], dtype=x.dtype, device=x.device)
    out_max = torch.empty_like(out_min)
    for lv in torch.unique(level).tolist():
        sel = torch.nonzero(level == lv).flatten()
        a, b = lo[sel], hi[sel] - (1 << lv) + 1
        out_min[..., sel] = torch.minimum(mins[lv][..., a], mins[lv][..., b])
        out_max[..., sel] = torch.maximum(maxs[lv][..., a], maxs[lv][..., b])
    return out_min, out_max
