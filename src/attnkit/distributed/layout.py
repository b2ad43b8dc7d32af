"""How a sequence is laid out over the ranks of a ring: each rank holds one or more contiguous *segments* of the
global sequence, concatenated in its local tensor.

=============  ======================================================================================
``contiguous`` rank ``r`` holds one slice; slices follow rank order (``r * L/P ... (r+1) * L/P - 1`` when even;
               any lengths may be passed, ragged included)
``zigzag``     the sequence is cut into ``2P`` chunks (``torch.tensor_split`` sizes); rank ``r`` holds chunks
               ``r`` and ``2P - 1 - r``, so under a causal mask every rank has the same work (Striped/zigzag
               load balancing: Brandon et al., 2023, https://arxiv.org/abs/2311.09431)
=============  ======================================================================================

A layout is a list, per rank, of ``(start, length)`` segments in global positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")

Segments = list[tuple[int, int]]  # (global start, length) of each contiguous run a rank holds, in local order


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    return layout


def split_sizes(n: int, parts: int) -> list[int]:
    """The sizes ``torch.tensor_split`` gives ``n`` items in ``parts`` parts (the first ``n % parts`` one larger)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def segments(layout: str, world_size: int, n: int | None = None, lengths: Sequence[int] | None = None
             ) -> list[Segments]:
    """Per rank, its ``(start, length)`` segments of a global sequence of ``n`` positions.

    ``contiguous`` takes the ranks' ``lengths`` when given (ragged slices), else even ``tensor_split`` slices of
    ``n``; ``zigzag`` always cuts ``n`` into ``2 * world_size`` ``tensor_split`` chunks."""
    check_layout(layout)
    if layout == "contiguous":
        sizes = list(lengths) if lengths is not None else split_sizes(n, world_size)
        starts = [sum(sizes[:r]) for r in range(world_size)]
        return [[(starts[r], sizes[r])] for r in range(world_size)]
    sizes = split_sizes(n, 2 * world_size)
    starts = [sum(sizes[:c]) for c in range(2 * world_size)]
    return [[(starts[r], sizes[r]), (starts[2 * world_size - 1 - r], sizes[2 * world_size - 1 - r])]
            for r in range(world_size)]


def shard(x: Tensor, rank: int, world_size: int, *, layout: str = "contiguous", dim: int = -2,
          lengths: Sequence[int] | None = None) -> Tensor:
    """Rank ``rank``'s part of the full tensor ``x`` along ``dim`` (the sequence dim; ``-2`` for ``(B, H, L, D)``).

    Shape:
        ``(..., L, ...)`` -> ``(..., L_r, ...)`` with ``L_r`` the rank's total segment length.
    """
    segs = segments(layout, world_size, x.shape[dim], lengths)[rank]
    return torch.cat([x.narrow(dim, s, n) for s, n in segs], dim=dim)  # (..., L_r, ...)


def unshard(parts: Sequence[Tensor], *, layout: str = "contiguous", dim: int = -2) -> Tensor:
    """The full tensor from every rank's part (in rank order): the inverse of :func:`shard`.

    Shape:
        ``P`` tensors ``(..., L_r, ...)`` -> ``(..., L, ...)``.
    """
    P = len(parts)
    n = sum(p.shape[dim] for p in parts)
    segs = segments(layout, P, n, [p.shape[dim] for p in parts])
    pieces: list[tuple[int, Tensor]] = []
    for r, part in enumerate(parts):
        off = 0
        for s, m in segs[r]:
            pieces.append((s, part.narrow(dim, off, m)))
            off += m
    return torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=dim)  # (..., L, ...)
