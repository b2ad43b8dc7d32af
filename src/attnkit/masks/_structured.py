"""The structured masks: each knows its closed form, its tiles and the keys no query sees.

Shape letters: G tiles, R query rows per tile, C key columns per tile, nq / nk query / key tiles, ``*mb`` the
mask's batch dims (empty, or one per batch dim of the scores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit._checks import check_broadcast, check_int, check_tensor
from attnkit.masks._base import EMPTY, FULL, PARTIAL, Mask, range_min_max, states_of, tracing

_INF = 2**62


def _batch_view(t: Tensor, batch_ndim: int) -> Tensor:
    """(B, *rest) -> (B, 1.., *rest) with ``batch_ndim`` leading dims."""
    return t.reshape(t.shape[0], *([1] * (batch_ndim - 1)), *t.shape[1:])


class Full(Mask):
    """Every query may attend to every key."""

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        return torch.ones(L, S, dtype=torch.bool, device=device)  # (L, S)

    def allowed(self, qi, kj, L, S, batch_ndim):
        return torch.ones(1, 1, 1, dtype=torch.bool, device=qi.device)

    def tile_states(self, q0, q1, k0, k1, L, S):
        return torch.full((q0.shape[0], k0.shape[0]), FULL, dtype=torch.int8, device=q0.device)

    @property
    def is_full(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "full()"


class Window(Mask):
    """Band around the diagonal: ``i' - left <= j <= i' + right`` with ``i' = i + shift``.

    ``align="bottom_right"`` (default): ``shift = S - L`` (the last query sees the last key, as FlashAttention
    >= 2.1 and a KV cache); ``"top_left"``: ``shift = 0``. ``left=None`` / ``right=None`` means unbounded on that
    side. Widths are inclusive: ``Window(w, 0)`` lets a query see itself and the ``w`` keys before it.
    """

    def __init__(self, left: int | None, right: int | None, *, align: str = "bottom_right"):
        self.left = None if left is None else check_int("left", left, minimum=0)
        self.right = None if right is None else check_int("right", right, minimum=0)
        if align not in ("bottom_right", "top_left"):
            raise ValueError(f"align must be 'bottom_right' or 'top_left'; got {align!r}.")
        self.align = align

    def shift(self, L: int, S: int) -> int:
        return S - L if self.align == "bottom_right" else 0

    def allowed(self, qi, kj, L, S, batch_ndim):
        rel = kj - (qi + self.shift(L, S))  # (G, R, C): key offset from the aligned diagonal
        ok = torch.ones_like(rel, dtype=torch.bool)
        if self.left is not None:
            ok &= rel >= -self.left
        if self.right is not None:
            ok &= rel <= self.right
        return ok

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        return self.allowed(torch.arange(L, device=device)[:, None], torch.arange(S, device=device)[None, :],
                            L, S, batch_ndim)  # (L, S)

    def tile_states(self, q0, q1, k0, k1, L, S):
        sh = self.shift(L, S)
        rmin = k0[None, :] - q1[:, None] - sh  # (nq, nk): smallest key offset in the tile
        rmax = k1[None, :] - q0[:, None] - sh  # (nq, nk): largest
        lo = -self.left if self.left is not None else -_INF
        hi = self.right if self.right is not None else _INF
        some = (rmax >= lo) & (rmin <= hi)
        return states_of(some, (rmin >= lo) & (rmax <= hi))

    def unused_keys(self, L, S, batch_ndim, device=None):
        sh = self.shift(L, S)
        lo = sh - self.left if self.left is not None else -S  # keys reachable from some query: [lo, hi]
        hi = L - 1 + sh + self.right if self.right is not None else 2 * S
        if L > 0 and lo <= 0 and hi >= S - 1:  # every key is reachable
            return None
        j = torch.arange(S, device=device)
        return ((j < lo) | (j > hi) | (L == 0)).unsqueeze(-1)  # (S, 1)

    def window(self):
        if self.align != "bottom_right" or self.left is None or self.right is None:
            return None
        return self.left, self.right

    def band(self):
        return self.window()

    @property
    def is_full(self) -> bool:
        return self.left is None and self.right is None

    def __repr__(self) -> str:
        al = "" if self.align == "bottom_right" else ", align='top_left'"
        return f"window(left={self.left}, right={self.right}{al})"


class Causal(Window):
    """Query ``i`` may attend to keys ``j <= i + shift`` (``window(None, 0)``; bottom-right aligned by default)."""

    def __init__(self, *, align: str = "bottom_right"):
        super().__init__(None, 0, align=align)

    @property
    def is_causal(self) -> bool:
        return self.align == "bottom_right"

    def __repr__(self) -> str:
        return "causal()" if self.align == "bottom_right" else "causal(align='top_left')"


def _lengths_tensor(name: str, lengths) -> Tensor:
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{name} must be an integer tensor or a sequence of ints; got {type(lengths).__name__}."
            ) from exc
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers; got dtype {lengths.dtype}. Convert with {name}.long().")
    return lengths


class Padding(Mask):
    """Key padding from valid lengths (d2l's ``valid_lens``): keys ``j < lengths`` may be attended.

    Args:
        lengths: ``(B,)`` valid keys per batch element, or ``(B, L)`` per query. Integer tensor or sequence.
    """

    batched = True

    def __init__(self, lengths: Tensor | Sequence[int]):
        lengths = _lengths_tensor("lengths", lengths)
        check_tensor("lengths", lengths, ndim=(1, 2), hint="Expected (B,) per sequence or (B, L) per query.")
        if lengths.numel() and not tracing() and int(lengths.min()) < 0:
            raise ValueError(f"lengths must be >= 0; got min {int(lengths.min())}.")
        self.lengths = lengths

    def _per_query(self, L: int) -> None:
        if self.lengths.ndim == 2 and self.lengths.shape[1] != L:
            raise ValueError(
                f"per-query lengths must have shape (B, L) = ({self.lengths.shape[0]}, {L}); "
                f"got {tuple(self.lengths.shape)}."
            )

    def allowed(self, qi, kj, L, S, batch_ndim):
        self._per_query(L)
        lengths = self.lengths.to(qi.device)
        if lengths.ndim == 1:
            lim = lengths.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        else:
            lim = lengths[:, qi.squeeze(-1)].unsqueeze(-1)  # (B, G, R, 1)
        return _batch_view(kj < lim, batch_ndim)  # (B, 1.., G, R, C)

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        self._per_query(L)
        lengths = self.lengths.to(device) if device is not None else self.lengths
        j = torch.arange(S, device=lengths.device)
        if lengths.ndim == 1:
            m = (j[None, :] < lengths[:, None])[:, None, :].expand(-1, L, -1)  # (B, L, S)
        else:
            m = j[None, None, :] < lengths[:, :, None]  # (B, L, S)
        return _batch_view(m, batch_ndim)  # (B, 1.., L, S)

    def tile_states(self, q0, q1, k0, k1, L, S):
        self._per_query(L)
        lengths = self.lengths.to(q0.device)
        if lengths.shape[0] == 0:
            return torch.full((q0.shape[0], k0.shape[0]), FULL, dtype=torch.int8, device=q0.device)
        if lengths.ndim == 1:
            shortest = lengths.amin().expand(q0.shape[0])
            longest = lengths.amax().expand(q0.shape[0])
        else:  # per query: over the batch and the tile's queries
            lo, hi = range_min_max(lengths, q0, q1)  # (B, nq)
            shortest, longest = lo.amin(0), hi.amax(0)
        return states_of(k0[None, :] < longest[:, None], k1[None, :] < shortest[:, None])

    def unused_keys(self, L, S, batch_ndim, device=None):
        lengths = self.lengths.to(device)
        if lengths.ndim == 2:  # a key is used if any query may see it (no queries: none is)
            lengths = lengths.amax(1) if lengths.shape[1] else lengths.new_zeros(lengths.shape[0])
        unused = torch.arange(S, device=device)[None, :] >= lengths[:, None]  # (B, S)
        return _batch_view(unused, batch_ndim).unsqueeze(-1)  # (B, 1.., S, 1)

    def check(self, scores_shape):
        b = self.lengths.shape[0]
        if len(scores_shape) < 3 or (scores_shape[0] != b and b != 1):
            raise ValueError(
                f"padding mask has lengths for batch {b}, but the scores have shape {scores_shape} "
                "(batch is the first dimension)."
            )
        self._per_query(scores_shape[-2])

    def __repr__(self) -> str:
        return f"padding(lengths={tuple(self.lengths.shape)})"


class Graph(Mask):
    """Attention only along edges: query (target) ``i`` may attend to key (source) ``j`` iff edge ``j -> i``.

    Give either ``edge_index`` ``(2, E)`` (row 0 = source, row 1 = target, as PyTorch Geometric) with
    ``num_nodes``, or a dense ``adjacency`` ``(N, N)`` boolean with ``adjacency[i, j]`` = query ``i`` sees key ``j``.
    """

    def __init__(self, edge_index: Tensor | None = None, *, num_nodes: int | None = None,
                 adjacency: Tensor | None = None, add_self_loops: bool = False):
        if (edge_index is None) == (adjacency is None):
            raise ValueError("graph mask needs exactly one of edge_index=(2, E) or adjacency=(N, N); got "
                             f"{'both' if edge_index is not None else 'neither'}.")
        if adjacency is not None:
            check_tensor("adjacency", adjacency, ndim=2)
            if adjacency.shape[0] != adjacency.shape[1]:
                raise ValueError(f"adjacency must be square (N, N); got {tuple(adjacency.shape)}.")
            tgt, src = adjacency.bool().nonzero(as_tuple=True)
            edge_index = torch.stack([src, tgt])
            num_nodes = adjacency.shape[0]
        check_tensor("edge_index", edge_index, ndim=2)
        if edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E) (sources, targets); got {tuple(edge_index.shape)}.")
        if edge_index.is_floating_point() or edge_index.dtype == torch.bool:
            raise TypeError(f"edge_index must hold integer node ids; got {edge_index.dtype}.")
        edge_index = edge_index.long()
        if num_nodes is None:
            num_nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
        check_int("num_nodes", num_nodes, minimum=0)
        if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
            raise ValueError(
                f"edge_index node ids must lie in [0, num_nodes={num_nodes}); got range "
                f"[{int(edge_index.min())}, {int(edge_index.max())}]."
            )
        if add_self_loops:
            loops = torch.arange(num_nodes, device=edge_index.device).repeat(2, 1)
            edge_index = torch.cat([edge_index, loops], dim=1)
        self.edge_index = edge_index
        self.num_nodes = num_nodes

    def _check_size(self, L: int, S: int) -> None:
        if L != self.num_nodes or S != self.num_nodes:
            raise ValueError(
                f"graph mask has {self.num_nodes} nodes, so queries and keys must number {self.num_nodes}; "
                f"got L={L}, S={S}."
            )

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        self._check_size(L, S)
        ei = self.edge_index.to(device) if device is not None else self.edge_index
        m = torch.zeros(L, S, dtype=torch.bool, device=ei.device)
        m[ei[1], ei[0]] = True  # (L, S): row = target (query), column = source (key)
        return m

    def tile_states(self, q0, q1, k0, k1, L, S):
        self._check_size(L, S)
        tiles = torch.zeros(q0.shape[0], k0.shape[0], dtype=torch.int8, device=q0.device)
        ei = self.edge_index.to(q0.device)
        qt = torch.searchsorted(q1, ei[1])  # tile of each edge's query (tiles are sorted, disjoint)
        kt = torch.searchsorted(k1, ei[0])
        tiles[qt, kt] = PARTIAL
        return tiles

    def unused_keys(self, L, S, batch_ndim, device=None):
        def build():
            used = torch.zeros(S, dtype=torch.bool, device=device)
            used[self.edge_index[0].to(device)] = True  # a key is used if it is the source of an edge
            return (~used).unsqueeze(-1)  # (S, 1)
        return self.remember(("unused", L, S, str(device)), build)

    def edges(self, N):
        self._check_size(N, N)
        return self.edge_index

    def check(self, scores_shape):
        self._check_size(*scores_shape[-2:])

    def __repr__(self) -> str:
        return f"graph(num_nodes={self.num_nodes}, num_edges={self.edge_index.shape[1]})"


class Dense(Mask):
    """Any boolean tensor broadcastable to the scores ``(..., L, S)`` (True = may attend)."""

    def __init__(self, tensor: Tensor):
        check_tensor("mask", tensor, boolean=True, min_ndim=1,
                     hint="Pass additive float terms as bias=, not mask=.")
        self.tensor = tensor
        self.batched = tensor.ndim > 2

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        t = self.tensor.to(device) if device is not None else self.tensor
        if t.shape[-1] not in (1, S) or (t.ndim > 1 and t.shape[-2] not in (1, L)):
            raise ValueError(f"mask of shape {tuple(t.shape)} does not broadcast to (..., L, S) = (..., {L}, {S}).")
        return t if t.ndim > 1 else t.unsqueeze(0)  # (..., L|1, S)

    def allowed(self, qi, kj, L, S, batch_ndim):
        t = self.materialize(L, S, device=qi.device)
        return t.expand(*t.shape[:-2], L, S)[..., qi, kj]  # (..., G, R, C)

    def tile_states(self, q0, q1, k0, k1, L, S):
        t = self.materialize(L, S, device=q0.device)
        t = t.expand(*t.shape[:-2], L, S).reshape(-1, L, S)  # (n, L, S)
        anyq, allq = _segments(t.any(0), q0, q1, -2), _segments(t.all(0), q0, q1, -2, all_=True)
        return states_of(_segments(anyq, k0, k1, -1), _segments(allq, k0, k1, -1, all_=True))

    def unused_keys(self, L, S, batch_ndim, device=None):
        def build():
            t = self.materialize(L, S, device=device)
            if t.shape[-1] != S:
                return None
            used = t.any(-2)  # (..., S): may any query attend this key?
            return (~used).unsqueeze(-1)  # (..., S, 1)
        return self.remember(("unused", L, S, str(device)), build)

    def check(self, scores_shape):
        check_broadcast("mask", self.tensor.shape, scores_shape)

    def __repr__(self) -> str:
        return f"dense({tuple(self.tensor.shape)})"


def _segments(t: Tensor, lo: Tensor, hi: Tensor, dim: int, all_: bool = False) -> Tensor:
    """any (or all) of boolean ``t`` over the index intervals ``[lo, hi]`` along ``dim``. Consecutive tiles of one
    size (what planners pass) are reduced through a view; other intervals through a cumulative count."""
    t = t.movedim(dim, -1)
    T = lo.shape[0]
    if T == 0:
        return t.new_zeros(*t.shape[:-1], 0).movedim(-1, dim)
    a, z, size = int(lo[0]), int(hi[-1]) + 1, int(hi[0]) - int(lo[0]) + 1
    if T * size >= z - a > (T - 1) * size and bool((lo == a + torch.arange(T, device=lo.device) * size).all()):
        seg = t[..., a:z]
        if T * size > z - a:  # pad the last tile with the value that changes neither any nor all
            seg = torch.cat([seg, seg.new_full((*seg.shape[:-1], T * size - (z - a)), all_)], -1)
        seg = seg.unflatten(-1, (T, size))
        out = seg.all(-1) if all_ else seg.any(-1)
    else:
        c = torch.cumsum(torch.cat([t.new_zeros(*t.shape[:-1], 1, dtype=torch.int64), t.long()], -1), -1)
        count = c[..., hi + 1] - c[..., lo]  # (..., T)
        out = count == (hi - lo + 1) if all_ else count > 0
    return out.movedim(-1, dim)


class _Combined(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self.batched = a.batched or b.batched

    def check(self, scores_shape):
        self.a.check(scores_shape)
        self.b.check(scores_shape)


class And(_Combined):
    """Both masks allow the pair."""

    def allowed(self, qi, kj, L, S, batch_ndim):
        return self.a.allowed(qi, kj, L, S, batch_ndim) & self.b.allowed(qi, kj, L, S, batch_ndim)

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        return (self.a.materialize(L, S, device=device, batch_ndim=batch_ndim)
                & self.b.materialize(L, S, device=device, batch_ndim=batch_ndim))

    def tile_states(self, q0, q1, k0, k1, L, S):
        a, b = self.a.tile_states(q0, q1, k0, k1, L, S), self.b.tile_states(q0, q1, k0, k1, L, S)
        return torch.where((a == EMPTY) | (b == EMPTY), EMPTY, torch.where((a == FULL) & (b == FULL), FULL, PARTIAL)
                           ).to(torch.int8)

    def unused_keys(self, L, S, batch_ndim, device=None):
        a = self.a.unused_keys(L, S, batch_ndim, device)
        b = self.b.unused_keys(L, S, batch_ndim, device)
        return a if b is None else b if a is None else a | b

    def band(self):
        a, b = self.a.band(), self.b.band()
        if a is None or b is None:
            return a or b
        return min(a[0], b[0]), min(a[1], b[1])

    @property
    def is_full(self) -> bool:
        return self.a.is_full and self.b.is_full

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


class Or(_Combined):
    """Either mask allows the pair."""

    def allowed(self, qi, kj, L, S, batch_ndim):
        return self.a.allowed(qi, kj, L, S, batch_ndim) | self.b.allowed(qi, kj, L, S, batch_ndim)

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        return (self.a.materialize(L, S, device=device, batch_ndim=batch_ndim)
                | self.b.materialize(L, S, device=device, batch_ndim=batch_ndim))

    def tile_states(self, q0, q1, k0, k1, L, S):
        a, b = self.a.tile_states(q0, q1, k0, k1, L, S), self.b.tile_states(q0, q1, k0, k1, L, S)
        return torch.where((a == FULL) | (b == FULL), FULL, torch.where((a == EMPTY) & (b == EMPTY), EMPTY, PARTIAL)
                           ).to(torch.int8)

    def unused_keys(self, L, S, batch_ndim, device=None):
        a = self.a.unused_keys(L, S, batch_ndim, device)
        b = self.b.unused_keys(L, S, batch_ndim, device)
        return None if a is None or b is None else a & b

    def band(self):
        a, b = self.a.band(), self.b.band()
        return None if a is None or b is None else (max(a[0], b[0]), max(a[1], b[1]))

    @property
    def is_full(self) -> bool:
        return self.a.is_full or self.b.is_full

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


class Not(Mask):
    """The pairs the mask forbids (``~mask``)."""

    def __init__(self, inner: Mask):
        self.inner = inner
        self.batched = inner.batched

    def allowed(self, qi, kj, L, S, batch_ndim):
        return ~self.inner.allowed(qi, kj, L, S, batch_ndim)

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        return ~self.inner.materialize(L, S, device=device, batch_ndim=batch_ndim)

    def tile_states(self, q0, q1, k0, k1, L, S):
        return (FULL - self.inner.tile_states(q0, q1, k0, k1, L, S)).to(torch.int8)

    def check(self, scores_shape):
        self.inner.check(scores_shape)

    def __invert__(self) -> Mask:
        return self.inner

    def __repr__(self) -> str:
        return f"~{self.inner!r}"


class Offset(Mask):
    """A mask seen from a shard: local query ``i`` / key ``j`` are global ``q_offset + i`` / ``k_offset + j`` of a
    problem with ``L`` queries and ``S`` keys (made by :meth:`Mask.offset`)."""

    def __init__(self, inner: Mask, q_offset: int, k_offset: int, L: int, S: int):
        self.inner = inner
        self.q_offset = check_int("q_offset", q_offset, minimum=0)
        self.k_offset = check_int("k_offset", k_offset, minimum=0)
        self.L, self.S = check_int("L", L, minimum=0), check_int("S", S, minimum=0)
        self.batched = inner.batched

    def _fits(self, L: int, S: int) -> None:
        if self.q_offset + L > self.L or self.k_offset + S > self.S:
            raise ValueError(
                f"a shard of {L} queries from {self.q_offset} and {S} keys from {self.k_offset} does not fit the "
                f"mask's problem of L={self.L} queries and S={self.S} keys."
            )

    def allowed(self, qi, kj, L, S, batch_ndim):
        self._fits(L, S)
        return self.inner.allowed(qi + self.q_offset, kj + self.k_offset, self.L, self.S, batch_ndim)

    def tile_states(self, q0, q1, k0, k1, L, S):
        self._fits(L, S)
        o, p = self.q_offset, self.k_offset
        return self.inner.tile_states(q0 + o, q1 + o, k0 + p, k1 + p, self.L, self.S)

    def check(self, scores_shape):
        self._fits(*scores_shape[-2:])
        self.inner.check((*scores_shape[:-2], self.L, self.S))

    def __repr__(self) -> str:
        return f"{self.inner!r}.offset({self.q_offset}, {self.k_offset}, L={self.L}, S={self.S})"


def as_mask(mask: Mask | Tensor) -> Mask:
    """``Mask`` objects pass through; boolean tensors become :class:`Dense`; anything else is a TypeError."""
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        return Dense(mask)
    raise TypeError(f"mask must be an attnkit Mask or a boolean tensor; got {type(mask).__name__}.")
