"""The block plan: which ``block x block`` tiles of an ``L x S`` problem a mask leaves empty, full or partial.

:class:`BlockMask` is the one plan object of attnkit: ``mask.plan(L, S)`` returns it for every mask,
``attnkit.flex.create_block_mask`` returns it for a ``mask_mod``, and every tile kernel reads it. It is itself a
:class:`~attnkit.masks.Mask` (it means what its source mask means), so it can be passed anywhere a mask can, and
built once per shape it is reused across layers and steps.

Planning never builds the ``L x S`` tensor. The mask classifies every tile from its index intervals
(:meth:`Mask.tile_states`, O(tiles)); only tiles it calls partial or cannot classify are evaluated, one chunk of
tiles at a time (O(chunk x tile^2) memory), and kept with their own boolean tile. Full tiles never evaluate the
mask; empty ones are dropped.

Shape letters: nq / nk query / key tiles, Bq = Bk = block, G query blocks of a group, c tiles per block of a
group, P partial tiles, ``*mb`` the mask's batch dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.masks._base import EMPTY, FULL, PARTIAL, Mask, block_sizes, cdiv, tile_bounds

_TILE_BUDGET = 1 << 24  # mask elements evaluated at once while planning


@dataclass
class Group:
    """Query blocks that read the same number of key tiles, computed together with batched matmuls.

    ``qblocks`` (G,) query block ids; ``kidx`` (G, Kw) key indices of each block, clamped into ``[0, S)``.
    The mask on those keys is given one of two ways:

    * ``allowed`` (*mb, G, Bq, Kw) bool, False on padding (so clamped duplicates weigh nothing); or
    * ``allowed=None`` and the key indices are ``c = Kw / block`` whole key tiles: every tile is fully kept except
      the ``P`` *partial* tiles ``(part_g[p], part_t[p])`` (row of the group, tile position in the row, sorted by
      row), whose forbidden pairs are ``forbid[p]`` (P, *mb, Bq, Bk). Such a group also has ``ktiles`` (G, c),
      the key tile ids (``kidx`` is ``ktiles * block + arange(block)``).
    """

    qblocks: Tensor
    kidx: Tensor
    allowed: Tensor | None
    part_g: Tensor | None = None
    part_t: Tensor | None = None
    forbid: Tensor | None = None
    ktiles: Tensor | None = None

    @property
    def masked(self) -> bool:
        """True when some score of the group may be masked (so a row may have no allowed key)."""
        return self.allowed is not None or (self.part_g is not None and self.part_g.numel() > 0)


class BlockMask(Mask):
    """The tiles of a mask on an ``L x S`` problem (see the module docstring).

    Attributes:
        L, S: query and key lengths (FlexAttention's ``Q_LEN``, ``KV_LEN``); ``shape`` is ``(B, H, L, S)``.
        block: tile rows and columns (``BLOCK_SIZE = (block, block)``).
        states: int8 ``(nq, nk)``: 0 empty, 1 partial, 2 full (over every batch element and head).
        mask: the mask it plans (evaluated on partial tiles and for ``materialize``).
        groups: the kernels' view: query blocks grouped by their number of tiles (:class:`Group`).
    """

    def __init__(self, L: int, S: int, block: int, groups: list[Group], *, mask: Mask | None = None,
                 states: Tensor | None = None, batch_ndim: int = 2, shape_bh: tuple[int, int] = (1, 1)):
        self.L, self.S, self.block, self.groups = L, S, block, groups
        self.mask, self.states, self.batch_ndim = mask, states, batch_ndim
        self.batched = mask.batched if mask is not None else False
        self.shape_bh = shape_bh

    # ---- what it is -----------------------------------------------------------------------------------

    @property
    def BLOCK_SIZE(self) -> tuple[int, int]:  # noqa: N802 (FlexAttention's name)
        return (self.block, self.block)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.shape_bh, self.L, self.S)

    @property
    def seq_lengths(self) -> tuple[int, int]:
        return (self.L, self.S)

    @property
    def pairs(self) -> int:
        """(query, key) pairs the kernels compute scores for, per batch element and head."""
        return sum(g.kidx.numel() * self.block for g in self.groups)

    @property
    def density(self) -> float:
        """Fraction of tiles that are not empty (1.0 for a problem without tiles)."""
        if self.states is None or self.states.numel() == 0:
            return 1.0
        return float((self.states > 0).float().mean())

    def sparsity(self) -> float:
        """Percentage of tiles skipped (FlexAttention's ``BlockMask.sparsity``)."""
        return 100.0 * (1.0 - self.density)

    def to_dense(self) -> Tensor:
        """Tile states as a ``(1, 1, nq, nk)`` int tensor: 0 empty, 1 partial, 2 full."""
        return self.states.view(1, 1, *self.states.shape).to(torch.int32)

    def __repr__(self) -> str:
        head = f"BlockMask(shape={self.shape}, block={self.block}, sparsity={self.sparsity():.2f}%"
        if self.states is None or self.states.numel() > 32 * 32:
            return head + ")"
        chars = {EMPTY: "  ", PARTIAL: "░░", FULL: "██"}
        rows = ["".join(chars[int(v)] for v in row) for row in self.states.tolist()]
        return head + ",\n" + "\n".join(rows) + "\n)"

    # ---- as a mask --------------------------------------------------------------------------------------

    def _source(self) -> Mask:
        if self.mask is None:
            raise ValueError("this BlockMask has no source mask to evaluate; build it with mask.plan(L, S).")
        return self.mask

    def _same(self, L: int, S: int) -> None:
        if (L, S) != (self.L, self.S):
            raise ValueError(
                f"this BlockMask was planned for L={self.L} queries and S={self.S} keys; got L={L}, S={S}. "
                "Plan the mask for these lengths (create_block_mask(..., Q_LEN, KV_LEN) or mask.plan(L, S))."
            )

    def allowed(self, qi, kj, L, S, batch_ndim):
        return self._source().allowed(qi, kj, L, S, batch_ndim)

    def materialize(self, L, S, *, device=None, batch_ndim=1):
        self._same(L, S)
        return self._source().materialize(L, S, device=device, batch_ndim=batch_ndim)

    def tile_states(self, q0, q1, k0, k1, L, S):
        return self._source().tile_states(q0, q1, k0, k1, L, S)

    def plan(self, L, S, block=128, *, batch_ndim=2, device=None):
        bq, bk = block_sizes(block)
        self._same(L, S)
        here = self.states is None or device is None or self.states.device == torch.device(device)
        if bq == bk == self.block and batch_ndim == self.batch_ndim and here:
            return self
        return self._source().plan(L, S, block, batch_ndim=batch_ndim, device=device)

    def unused_keys(self, L, S, batch_ndim, device=None):
        return self._source().unused_keys(L, S, batch_ndim, device)

    def check(self, scores_shape):
        self._same(*scores_shape[-2:])
        if self.mask is not None:
            self.mask.check(scores_shape)

    def window(self):
        """``(left, right)`` when the planned mask is exactly a bottom-right band, found from the plan itself
        (a sliding window written as a ``mask_mod`` is then served by the window kernel), else None."""
        if self.mask is not None and self.mask.window() is not None:
            return self.mask.window()
        if self.states is None or not self.groups:
            return None
        return self.remember(("band",), lambda: _band_of(self))

    def band(self):
        return self.window() or (self.mask.band() if self.mask is not None else None)

    def edges(self, N):
        return self.mask.edges(N) if self.mask is not None else None

    @property
    def is_full(self) -> bool:
        return self.mask is not None and self.mask.is_full

    @property
    def is_causal(self) -> bool:
        return self.mask is not None and self.mask.is_causal


def _band_of(plan: BlockMask) -> tuple[int, int] | None:
    """``(left, right)`` if every query row ``i`` allows exactly the keys ``max(0, i' - left) .. min(S - 1, i' +
    right)`` (``i' = i + S - L``) and the mask is the same for every batch element and head; else None. Reads
    the plan's tiles (full tiles and the partial tiles' boolean masks), O(tiles x block)."""
    L, S, blk = plan.L, plan.S, plan.block
    dev = plan.states.device
    nrows = -(-L // blk) * blk
    first = torch.full((nrows,), S, dtype=torch.long, device=dev)
    last = torch.full((nrows,), -1, dtype=torch.long, device=dev)
    count = torch.zeros(nrows, dtype=torch.long, device=dev)
    cols = torch.arange(blk, device=dev)
    for grp in plan.groups:
        if grp.ktiles is None:
            return None
        G, c = grp.ktiles.shape
        partial = torch.zeros(G, c, dtype=torch.bool, device=dev)
        if grp.part_g is not None and grp.part_g.numel():
            if math.prod(grp.forbid.shape[1:-2]) != 1:
                return None  # differs between batch elements or heads
            partial[grp.part_g, grp.part_t] = True
            ok = ~grp.forbid.reshape(-1, blk, blk)  # (P, Bq, Bk)
            has = ok.any(-1)  # (P, Bq)
            f = ok.to(torch.int8).argmax(-1)
            z = blk - 1 - ok.flip(-1).to(torch.int8).argmax(-1)
            k0 = (grp.ktiles[grp.part_g, grp.part_t] * blk).unsqueeze(-1)  # (P, 1)
            rows = (grp.qblocks[grp.part_g].unsqueeze(-1) * blk + cols).flatten()  # (P * Bq,)
            big = torch.full_like(f, S)
            first.scatter_reduce_(0, rows, torch.where(has, k0 + f, big).flatten(), "amin")
            last.scatter_reduce_(0, rows, torch.where(has, k0 + z, -1).flatten(), "amax")
            count.index_add_(0, rows, ok.sum(-1).flatten())
        fg, ft = torch.nonzero(~partial, as_tuple=True)
        if fg.numel():
            k0 = (grp.ktiles[fg, ft] * blk).unsqueeze(-1)  # (F, 1): full tiles hold no padding
            rows = (grp.qblocks[fg].unsqueeze(-1) * blk + cols).flatten()
            first.scatter_reduce_(0, rows, k0.expand(-1, blk).flatten(), "amin")
            last.scatter_reduce_(0, rows, (k0 + blk - 1).expand(-1, blk).flatten(), "amax")
            count.index_add_(0, rows, torch.full_like(rows, blk))
    first, last, count = first[:L], last[:L], count[:L]
    live = count > 0
    if not bool(live.any()) or bool((count[live] != last[live] - first[live] + 1).any()):
        return None  # empty, or some row's keys are not one contiguous run
    diag = torch.arange(L, device=dev) + (S - L)
    left, right = int((diag - first)[live].max()), int((last - diag)[live].max())
    if left < 0 or right < 0:
        return None
    lo, hi = (diag - left).clamp(min=0), (diag + right).clamp(max=S - 1)
    want = lo <= hi
    if not torch.equal(want, live) or not torch.equal(first[live], lo[live]) or not torch.equal(last[live], hi[live]):
        return None
    return left, right


def allowed_on(mask: Mask | None, qi: Tensor, kj: Tensor, L: int, S: int, batch_ndim: int) -> Tensor:
    """``mask.allowed`` on index tiles that may run past the problem (tile padding): outside ``[0, L)`` /
    ``[0, S)`` is always False, and the mask only ever sees indices clamped into range.

    Shape:
        qi (G, R), kj (G, C) -> (*mb, G, R, C).
    """
    qi3, kj3 = qi.unsqueeze(-1), kj.unsqueeze(-2)  # (G, R, 1), (G, 1, C)
    inside = (qi3 < L) & (qi3 >= 0) & (kj3 >= 0) & (kj3 < S)  # (G, R, C)
    if mask is None:
        return inside
    ok = mask.allowed(qi3.clamp(0, max(L - 1, 0)), kj3.clamp(0, max(S - 1, 0)), L, S, batch_ndim)
    if ok.dtype != torch.bool:
        raise TypeError(f"a mask must evaluate to booleans (True = may attend); {mask!r} gave {ok.dtype}.")
    return ok & inside


def nonempty_tiles(mask: Mask, L: int, S: int, bq: int, bk: int, device) -> Tensor:
    """Boolean ``(nq, nk)``: tiles of ``bq x bk`` holding an allowed pair (see :meth:`Mask.block_mask`)."""
    q0, q1 = tile_bounds(L, bq, device=device)
    k0, k1 = tile_bounds(S, bk, device=device)
    if not (q0.numel() and k0.numel()):
        return torch.zeros(q0.shape[0], k0.shape[0], dtype=torch.bool, device=device)
    states = mask.tile_states(q0, q1, k0, k1, L, S)
    out = states > 0
    cand = torch.nonzero(states == PARTIAL)
    step = max(1, _TILE_BUDGET // (bq * bk))
    for a in range(0, cand.shape[0], step):
        c = cand[a : a + step]
        qi = c[:, :1] * bq + torch.arange(bq, device=device)
        kj = c[:, 1:] * bk + torch.arange(bk, device=device)
        ok = allowed_on(mask, qi, kj, L, S, 2)  # (*mb, t, Bq, Bk)
        out[c[:, 0], c[:, 1]] = ok.reshape(-1, *ok.shape[-3:]).any(0).flatten(1).any(1) if ok.ndim > 3 else \
            ok.flatten(1).any(1)
    return out


def build_plan(mask: Mask, L: int, S: int, block: tuple[int, int], batch_ndim: int, device) -> BlockMask:
    """:class:`BlockMask` of ``mask`` (see the module docstring); use ``mask.plan(L, S)``, which caches it."""
    bq, bk = block
    if bq != bk:
        raise ValueError(f"attnkit plans square tiles; got BLOCK_SIZE=({bq}, {bk}). Use one size, e.g. {bq}.")
    block = bq
    nq, nk = cdiv(L, block), cdiv(S, block)
    q0, q1 = tile_bounds(L, block, device=device)
    k0, k1 = tile_bounds(S, block, device=device)
    states = mask.tile_states(q0, q1, k0, k1, L, S).to(torch.int8).clone() if nq and nk else \
        torch.zeros(nq, nk, dtype=torch.int8, device=device)
    # a tile that runs past L or S holds padding, which kernels treat as masked: never "full"
    if L % block and nq:
        states[-1] = torch.where(states[-1] == FULL, PARTIAL, states[-1])
    if S % block and nk:
        states[:, -1] = torch.where(states[:, -1] == FULL, PARTIAL, states[:, -1])
    rows = torch.arange(block, device=device)
    cand = torch.nonzero(states == PARTIAL)  # (T, 2): the tiles to evaluate, row-major
    T = cand.shape[0]
    forbid_parts, part_ids = [], []
    mb_shape = None
    step = max(1, _TILE_BUDGET // (block * block))
    for a in range(0, T, step):
        c = cand[a : a + step]
        ok = allowed_on(mask, c[:, :1] * block + rows, c[:, 1:] * block + rows, L, S, batch_ndim)
        ok = ok.expand(*ok.shape[:-3], c.shape[0], block, block)  # (*mb, t, Bq, Bk)
        if mb_shape is None:  # the mask's batch dims, one per batch dim of the scores
            mb = tuple(ok.shape[:-3])
            mb_shape = (1,) * max(0, batch_ndim - len(mb)) + mb
        per = ok.reshape(-1, *ok.shape[-3:]).transpose(0, 1).flatten(1)  # (t, mb * Bq * Bk)
        anyk, allk = per.any(1), per.all(1)
        states[c[:, 0], c[:, 1]] = anyk.to(torch.int8) + allk.to(torch.int8)
        part = torch.nonzero(anyk & ~allk).flatten()  # (p,) local ids of partial tiles
        if part.numel():
            f = ~ok.index_select(-3, part).movedim(-3, 0)  # (p, *mb, Bq, Bk)
            forbid_parts.append(f.reshape(part.numel(), *mb_shape, block, block))
            part_ids.append(cand[a + part])
    # tile (q, k) -> row of forbid_all, for the partial ones
    slot = torch.full((nq, nk), -1, dtype=torch.long, device=device)
    if part_ids:
        pid = torch.cat(part_ids)
        slot[pid[:, 0], pid[:, 1]] = torch.arange(pid.shape[0], device=device)
    forbid_all = torch.cat(forbid_parts) if forbid_parts else None  # (P, *mb, Bq, Bk)

    live = torch.nonzero(states > 0)  # (T', 2) row-major
    qb_of, kb_of = live[:, 0], live[:, 1]
    counts = torch.bincount(qb_of, minlength=nq)  # (nq,)
    first = torch.cumsum(counts, 0) - counts  # (nq,): position of each block's first live tile
    groups = []
    for c in sorted(set(counts.tolist()) - {0}):
        qblocks = torch.nonzero(counts == c).flatten()  # (G,)
        pos = first[qblocks].unsqueeze(-1) + torch.arange(c, device=device)  # (G, c) into live
        kblocks = kb_of[pos]  # (G, c)
        kidx = (kblocks.unsqueeze(-1) * block + rows).flatten(1)  # (G, c * Bk)
        sl = slot[qb_of[pos], kblocks]  # (G, c): row in forbid_all or -1
        pg, pt = torch.nonzero(sl >= 0, as_tuple=True)  # sorted by group row
        forbid = forbid_all.index_select(0, sl[pg, pt]) if pg.numel() else None
        groups.append(Group(qblocks, kidx.clamp(0, max(S - 1, 0)), None, pg, pt, forbid, kblocks))
    bh = _batch_heads(mb_shape)
    return BlockMask(L, S, block, groups, mask=mask, states=states, batch_ndim=batch_ndim, shape_bh=bh)


def _batch_heads(mb_shape: tuple[int, ...] | None) -> tuple[int, int]:
    if not mb_shape:
        return (1, 1)
    mb = (1,) * max(0, 2 - len(mb_shape)) + tuple(mb_shape)
    return (mb[-2], mb[-1])
