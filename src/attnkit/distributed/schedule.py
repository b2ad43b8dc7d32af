"""Which key rows each rank needs from each other rank, decided from the mask alone, so that the sender and the
receiver of every transfer compute the same answer and no send is ever left without its receive.

For a query range and a key range (global positions) the needed keys are the hull of the mask's non-empty
``T x T`` tiles (``mask.block_mask``: exact per tile, unions over the batch), cut further to the mask's band
(``mask.band()``: a window's ``(left, right)`` widths) when it has one. A window narrower than a slice so needs
only the ``left`` last rows of the previous rank and the ``right`` first rows of the next: the halos.
"""

from __future__ import annotations

import torch

from attnkit.masks import Mask

Range = tuple[int, int] | None  # [a, b) in global key positions, None when empty


def tile_for(L: int, S: int) -> int:
    """Tile side of the schedule's block mask: the smallest giving at most 512 x 512 tiles."""
    return max(1, -(-max(L, S, 1) // 512))


class Schedule:
    """The transfers and blocks of one ring problem.

    Args:
        mask: the global mask (an attnkit :class:`~attnkit.masks.Mask`).
        q_segs, k_segs: per rank, its ``(start, length)`` query / key segments (:mod:`attnkit.distributed.layout`).
        L, S: global query / key lengths.
    """

    def __init__(self, mask: Mask, q_segs, k_segs, L: int, S: int):
        self.mask, self.q_segs, self.k_segs, self.L, self.S = mask, q_segs, k_segs, L, S
        self.tile = tile_for(L, S)
        self.tiles = mask.block_mask(L, S, self.tile).cpu() if L and S else None  # (nq, nk) bool
        self.band = mask.band()
        self._pairs: dict[tuple[int, int], list[list[Range]]] = {}

    def key_range(self, q0: int, q1: int, k0: int, k1: int) -> Range:
        """The keys of ``[k0, k1)`` that some query of ``[q0, q1)`` may see, as one hull ``[a, b)``, or None."""
        if q1 <= q0 or k1 <= k0:
            return None
        T = self.tile
        cols = self.tiles[q0 // T:(q1 - 1) // T + 1, k0 // T:(k1 - 1) // T + 1].any(0)  # (nk',)
        hit = torch.nonzero(cols).flatten()
        if hit.numel() == 0:
            return None
        first = (k0 // T + int(hit[0])) * T
        last = (k0 // T + int(hit[-1]) + 1) * T
        a, b = max(k0, first), min(k1, last)
        if self.band is not None:
            left, right = self.band
            sh = self.S - self.L  # bottom-right alignment of the band
            a, b = max(a, q0 + sh - left), min(b, q1 + sh + right)
        return (a, b) if a < b else None

    def pairs(self, d: int, o: int) -> list[list[Range]]:
        """``[i][j]``: the keys of rank ``o``'s key segment ``j`` that rank ``d``'s query segment ``i`` needs."""
        key = (d, o)
        if key not in self._pairs:
            self._pairs[key] = [[self.key_range(qs, qs + ql, ks, ks + kl) for ks, kl in self.k_segs[o]]
                                for qs, ql in self.q_segs[d]]
        return self._pairs[key]

    def need(self, o: int, d: int) -> list[Range]:
        """Per key segment of rank ``o``: the hull of the rows rank ``d`` needs (what ``o`` sends ``d``)."""
        p = self.pairs(d, o)
        out: list[Range] = []
        for j in range(len(self.k_segs[o])):
            rs = [p[i][j] for i in range(len(p)) if p[i][j] is not None]
            out.append((min(r[0] for r in rs), max(r[1] for r in rs)) if rs else None)
        return out

    def rows(self, o: int, d: int) -> int:
        """How many key rows rank ``o`` sends rank ``d``."""
        return sum(b - a for r in self.need(o, d) if r is not None for a, b in [r])

    def local_index(self, o: int, d: int) -> list[tuple[int, int, int]]:
        """Per needed range of ``o``'s segments: ``(local row in o's tensor, global start, length)``."""
        out, off = [], 0
        for (ks, kl), r in zip(self.k_segs[o], self.need(o, d), strict=True):
            if r is not None:
                out.append((off + r[0] - ks, r[0], r[1] - r[0]))
            off += kl
        return out

    def blocks(self, d: int, o: int, whole: bool) -> list[tuple[int, int, int, int, int, int]]:
        """The non-empty blocks rank ``d`` computes with keys from rank ``o``: ``(local query row, global query
        start, query rows, row in the key piece, global key start, key rows)``. The piece is ``o``'s whole tensor
        when ``whole`` (``o == d``), else the rows ``o`` sent (:meth:`local_index` order)."""
        starts: list[int | None] = []
        off = 0
        for (ks, kl), r in zip(self.k_segs[o], self.need(o, d), strict=True):
            if whole:
                starts.append(off - ks)  # piece row of global key g: g + starts[j]
                off += kl
            elif r is not None:
                starts.append(off - r[0])
                off += r[1] - r[0]
            else:
                starts.append(None)
        out, qoff = [], 0
        for i, (qs, ql) in enumerate(self.q_segs[d]):
            for j, rng in enumerate(self.pairs(d, o)[i]):
                if rng is not None:
                    a, b = rng
                    out.append((qoff, qs, ql, a + starts[j], a, b - a))
            qoff += ql
        return out
