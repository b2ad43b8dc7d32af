"""Structured attention masks. One meaning everywhere: True = the query may attend to the key.

A mask is a small object that *describes* which (query, key) pairs are allowed and can materialize that as a
dense boolean tensor. Because the structure is kept (a window's widths, a graph's edge list, which blocks hold
anything), kernels can skip what is empty instead of paying for all ``L x S`` pairs.

====================  ======================================================================================
``full()``            every pair
``causal()``          key ``j`` is allowed for query ``i`` iff ``j <= i + (S - L)`` (bottom-right aligned, as
                      FlashAttention >= 2.1: the last query sees every key; with ``L > S`` the first
                      ``L - S`` queries see nothing and get zero output)
``padding(lengths)``  keys ``j < lengths[b]`` (``lengths`` ``(B,)``), or ``j < lengths[b, i]`` per query
                      (``(B, L)``): d2l's ``valid_lens``
``window(l, r)``      ``i' - l <= j <= i' + r`` with ``i' = i + (S - L)``; widths are inclusive, so
                      ``window(w, 0)`` sees ``w + 1`` keys: truncated self-attention (speech)
``graph(...)``        query ``i`` sees key ``j`` iff there is an edge ``j -> i`` (``edge_index[0]`` = source,
                      ``edge_index[1]`` = target, as PyTorch Geometric), or ``adjacency[i, j]`` is True
``dense(t)``          any boolean tensor broadcastable to the scores
``a & b``, ``a | b``  both / either
====================  ======================================================================================

Shapes: ``materialize(L, S)`` returns ``(L, S)`` for masks that are the same for every batch element and
``(B, 1, ..., 1, L, S)`` for batched masks (padding), with ``batch_ndim`` leading dims so that it broadcasts
against scores ``(B, L, S)`` (``batch_ndim=1``) or ``(B, H, L, S)`` (``batch_ndim=2``). ``dense`` tensors keep
their own shape and broadcast from the right, like any PyTorch mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit._checks import check_int, check_tensor

__all__ = [
    "Mask", "Full", "Causal", "Padding", "Window", "Graph", "Dense", "And", "Or",
    "full", "causal", "padding", "window", "graph", "dense", "as_mask", "materialize",
]


class Mask:
    """Base class. Subclasses implement :meth:`materialize`; they may override :meth:`block_mask`."""

    #: True when the mask differs between batch elements (its materialized form has a leading ``B``).
    batched: bool = False

    def materialize(self, L: int, S: int, *, device=None, batch_ndim: int = 1) -> Tensor:
        """Dense boolean tensor, True = may attend.

        Shape:
            ``(L, S)`` for unbatched masks; ``(B, *[1] * (batch_ndim - 1), L, S)`` for batched ones.
        """
        raise NotImplementedError

    def block_mask(self, L: int, S: int, block: int | tuple[int, int] = 128, *, device=None) -> Tensor:
        """Which ``block x block`` tiles hold at least one allowed pair (union over the batch).

        Kernels use it to skip empty tiles. The default materializes the mask; structured masks override it
        with a closed form that never builds the ``L x S`` tensor.

        Shape:
            ``(ceil(L / bq), ceil(S / bk))``, boolean.
        """
        bq, bk = _block_sizes(block)
        dense_mask = self.materialize(L, S, device=device)
        dense_mask = torch.broadcast_to(dense_mask, (*dense_mask.shape[:-2], L, S))  # (..., L, S)
        dense_mask = dense_mask.reshape(-1, L, S).any(0)  # (L, S): union over batch
        return _tile_any(dense_mask, bq, bk)

    def __and__(self, other: Mask | Tensor) -> Mask:
        return And(self, as_mask(other))

    def __rand__(self, other: Tensor) -> Mask:
        return And(as_mask(other), self)

    def __or__(self, other: Mask | Tensor) -> Mask:
        return Or(self, as_mask(other))

    def __ror__(self, other: Tensor) -> Mask:
        return Or(as_mask(other), self)


class Full(Mask):
    """Every query may attend to every key."""

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        return torch.ones(L, S, dtype=torch.bool, device=device)  # (L, S)

    def block_mask(self, L, S, block=128, *, device=None):
        bq, bk = _block_sizes(block)
        return torch.ones(_cdiv(L, bq), _cdiv(S, bk), dtype=torch.bool, device=device)

    def __repr__(self) -> str:
        return "full()"


class Window(Mask):
    """Band around the (bottom-right aligned) diagonal: ``i' - left <= j <= i' + right``, ``i' = i + S - L``.

    ``left=None`` / ``right=None`` means unbounded on that side. Widths are inclusive: ``Window(w, 0)`` lets a
    query see itself and the ``w`` keys before it (``w + 1`` keys).
    """

    def __init__(self, left: int | None, right: int | None):
        self.left = None if left is None else check_int("left", left, minimum=0)
        self.right = None if right is None else check_int("right", right, minimum=0)

    def _bounds(self, L: int, S: int, device=None) -> tuple[Tensor, Tensor]:
        diag = torch.arange(L, device=device) + (S - L)  # (L,): aligned key index of each query
        lo = diag - self.left if self.left is not None else torch.full_like(diag, -(2**62))
        hi = diag + self.right if self.right is not None else torch.full_like(diag, 2**62)
        return lo, hi

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        lo, hi = self._bounds(L, S, device)
        j = torch.arange(S, device=device)
        return (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])  # (L, S)

    def block_mask(self, L, S, block=128, *, device=None):
        bq, bk = _block_sizes(block)
        nq, nk = _cdiv(L, bq), _cdiv(S, bk)
        q0 = torch.arange(nq, device=device) * bq
        q1 = torch.clamp(q0 + bq, max=L) - 1
        shift = S - L
        # keys reachable from the tile's queries: [q0 + shift - left, q1 + shift + right]
        lo = q0 + shift - (self.left if self.left is not None else 2**62)
        hi = q1 + shift + (self.right if self.right is not None else 2**62)
        k0 = torch.arange(nk, device=device) * bk
        k1 = torch.clamp(k0 + bk, max=S) - 1
        tiles = (k1[None, :] >= lo[:, None]) & (k0[None, :] <= hi[:, None])  # (nq, nk)
        # queries whose own band is empty (can happen when L > S) make no tile non-empty: refine by clipping
        return tiles & (hi[:, None] >= 0) & (lo[:, None] <= S - 1)

    def __repr__(self) -> str:
        return f"window(left={self.left}, right={self.right})"


class Causal(Window):
    """Query ``i`` may attend to keys ``j <= i + (S - L)`` (bottom-right aligned; equals ``window(None, 0)``)."""

    def __init__(self):
        super().__init__(None, 0)

    def __repr__(self) -> str:
        return "causal()"


class Padding(Mask):
    """Key padding from valid lengths (d2l's ``valid_lens``): keys ``j < lengths`` may be attended.

    Args:
        lengths: ``(B,)`` valid keys per batch element, or ``(B, L)`` per query. Integer tensor or sequence.
    """

    batched = True

    def __init__(self, lengths: Tensor | Sequence[int]):
        if not isinstance(lengths, Tensor):
            try:
                lengths = torch.as_tensor(lengths)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(
                    f"lengths must be an integer tensor or a sequence of ints; got {type(lengths).__name__}."
                ) from exc
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(
                f"lengths must hold integers (valid key counts); got dtype {lengths.dtype}. "
                "Convert with lengths.long()."
            )
        check_tensor("lengths", lengths, ndim=(1, 2), hint="Expected (B,) per sequence or (B, L) per query.")
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"lengths must be >= 0; got min {int(lengths.min())}.")
        self.lengths = lengths

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        lengths = self.lengths.to(device) if device is not None else self.lengths
        j = torch.arange(S, device=lengths.device)
        if lengths.ndim == 1:
            m = (j[None, :] < lengths[:, None])[:, None, :].expand(-1, L, -1)  # (B, L, S)
        else:
            if lengths.shape[1] != L:
                raise ValueError(
                    f"per-query lengths must have shape (B, L) = ({lengths.shape[0]}, {L}); "
                    f"got {tuple(lengths.shape)}."
                )
            m = j[None, None, :] < lengths[:, :, None]  # (B, L, S)
        return m.reshape(m.shape[0], *([1] * (batch_ndim - 1)), L, S)  # (B, 1.., L, S)

    def block_mask(self, L, S, block=128, *, device=None):
        bq, bk = _block_sizes(block)
        nq = _cdiv(L, bq)
        lengths = self.lengths.to(device) if device is not None else self.lengths
        if lengths.ndim == 1:
            longest = lengths.amax().expand(nq) if lengths.numel() else torch.zeros(nq, dtype=lengths.dtype)
        else:  # per query: the longest row of each query tile, over the batch
            per_query = lengths.amax(0) if lengths.shape[0] else torch.zeros(L, dtype=lengths.dtype)  # (L,)
            padded = torch.zeros(nq * bq, dtype=per_query.dtype, device=per_query.device)
            padded[:L] = per_query
            longest = padded.view(nq, bq).amax(1)  # (nq,)
        k0 = torch.arange(_cdiv(S, bk), device=longest.device) * bk
        return k0[None, :] < longest[:, None]  # (nq, nk)

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

    def block_mask(self, L, S, block=128, *, device=None):
        self._check_size(L, S)
        bq, bk = _block_sizes(block)
        tiles = torch.zeros(_cdiv(L, bq), _cdiv(S, bk), dtype=torch.bool, device=device)
        ei = self.edge_index.to(tiles.device)
        tiles[ei[1] // bq, ei[0] // bk] = True
        return tiles

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

    def __repr__(self) -> str:
        return f"dense({tuple(self.tensor.shape)})"


class _Combined(Mask):
    op = None
    symbol = "?"

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self.batched = a.batched or b.batched

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        ma = self.a.materialize(L, S, device=device, batch_ndim=batch_ndim)
        mb = self.b.materialize(L, S, device=device, batch_ndim=batch_ndim)
        return type(self).op(ma, mb)

    def block_mask(self, L, S, block=128, *, device=None):
        return type(self).op(self.a.block_mask(L, S, block, device=device),
                             self.b.block_mask(L, S, block, device=device))

    def __repr__(self) -> str:
        return f"({self.a!r} {self.symbol} {self.b!r})"


class And(_Combined):
    """Both masks allow the pair. ``block_mask`` is a superset (a tile may be non-empty in each but not both)."""

    op = staticmethod(torch.logical_and)
    symbol = "&"


class Or(_Combined):
    """Either mask allows the pair."""

    op = staticmethod(torch.logical_or)
    symbol = "|"


# ---- constructors (the public spelling) -------------------------------------------------------------------

def full() -> Full:
    """Every pair allowed."""
    return Full()


def causal() -> Causal:
    """Bottom-right aligned causal mask: query ``i`` sees keys ``j <= i + S - L``."""
    return Causal()


def padding(lengths: Tensor | Sequence[int]) -> Padding:
    """Key padding from valid lengths ``(B,)`` or per-query ``(B, L)`` (d2l's ``valid_lens``)."""
    return Padding(lengths)


def window(left: int | None, right: int | None = 0) -> Window:
    """Truncated attention: ``left`` keys before and ``right`` after the aligned diagonal (inclusive)."""
    return Window(left, right)


def graph(edge_index: Tensor | None = None, *, num_nodes: int | None = None, adjacency: Tensor | None = None,
          add_self_loops: bool = False) -> Graph:
    """Attend only along edges (``edge_index`` ``(2, E)`` source -> target, or dense ``adjacency`` ``(N, N)``)."""
    return Graph(edge_index, num_nodes=num_nodes, adjacency=adjacency, add_self_loops=add_self_loops)


def dense(tensor: Tensor) -> Dense:
    """Wrap a boolean tensor (True = may attend)."""
    return Dense(tensor)


def as_mask(mask: Mask | Tensor) -> Mask:
    """``Mask`` objects pass through; boolean tensors become :class:`Dense`; anything else is a TypeError."""
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        return Dense(mask)
    raise TypeError(f"mask must be an attnkit Mask or a boolean tensor; got {type(mask).__name__}.")


def materialize(mask: Mask | Tensor, L: int, S: int, *, device=None, batch_ndim: int = 1) -> Tensor:
    """Dense boolean form of ``mask`` for scores ``(..., L, S)`` (see the module docstring for shapes)."""
    return as_mask(mask).materialize(L, S, device=device, batch_ndim=batch_ndim)


# ---- helpers ------------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_sizes(block: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block, int):
        block = (block, block)
    bq, bk = block
    check_int("block", bq, minimum=1)
    check_int("block", bk, minimum=1)
    return bq, bk


def _tile_any(m: Tensor, bq: int, bk: int) -> Tensor:
    L, S = m.shape
    nq, nk = _cdiv(L, bq), _cdiv(S, bk)
    padded = torch.zeros(nq * bq, nk * bk, dtype=torch.bool, device=m.device)
    padded[:L, :S] = m
    return padded.view(nq, bq, nk, bk).any(3).any(1)  # (nq, nk)

