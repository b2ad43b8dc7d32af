"""Evaluate an attnkit mask on gathered (query, key) index tiles, without building the L x S tensor.

Kernels that work block by block need the mask only where they compute scores. ``mask_on_tiles`` answers
"may query ``qi[g, r]`` attend to key ``kj[g, c]``?" for every tile ``g``, from the mask's closed form
(``Full``, ``Window``/``Causal``, ``Padding``, ``And``/``Or`` of those) or by gathering from the dense tensor
(``Dense``). Other masks (``Graph``, user subclasses) are materialized once and gathered from.

Shape letters: G tiles, R query rows per tile, C key columns per tile, ``*mb`` the mask's batch dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit import masks as _masks


def mask_on_tiles(mask: _masks.Mask | None, qi: Tensor, kj: Tensor, L: int, S: int, batch_ndim: int) -> Tensor:
    """Boolean "may attend" for query rows ``qi`` and key columns ``kj`` of each tile.

    Positions outside ``[0, L)`` / ``[0, S)`` (padding of the tiles) are always False.

    Args:
        mask: an attnkit mask or None (all allowed).
        qi: query indices per tile. kj: key indices per tile (may lie outside ``[0, S)``).
        L, S: query and key lengths. batch_ndim: number of batch dims before ``(L, S)`` in the scores.

    Shape:
        qi (G, R), kj (G, C) -> (*mb, G, R, C) with ``*mb`` empty or ``batch_ndim`` dims broadcastable to the
        scores' batch dims.
    """
    qi3 = qi.unsqueeze(-1)  # (G, R, 1)
    kj3 = kj.unsqueeze(-2)  # (G, 1, C)
    inside = (qi3 < L) & (qi3 >= 0) & (kj3 >= 0) & (kj3 < S)  # (G, R, C)
    if mask is None:
        return inside
    return _eval(mask, qi3.clamp(0, max(L - 1, 0)), kj3.clamp(0, max(S - 1, 0)), L, S, batch_ndim) & inside


def _eval(mask: _masks.Mask, qi3: Tensor, kj3: Tensor, L: int, S: int, batch_ndim: int) -> Tensor:
    if isinstance(mask, _masks.Full):
        return torch.ones(1, 1, 1, dtype=torch.bool, device=qi3.device)
    if isinstance(mask, _masks.Window):  # Causal is a Window(None, 0)
        # allowed iff i' - left <= j <= i' + right, i' = i + S - L
        rel = kj3 - (qi3 + (S - L))  # (G, R, C)
        ok = torch.ones_like(rel, dtype=torch.bool)
        if mask.left is not None:
            ok &= rel >= -mask.left
        if mask.right is not None:
            ok &= rel <= mask.right
        return ok
    if isinstance(mask, _masks.Padding):
        lengths = mask.lengths.to(qi3.device)
        if lengths.ndim == 1:
            lim = lengths.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        else:
            if lengths.shape[1] != L:
                raise ValueError(
                    f"per-query lengths must have shape (B, L) = ({lengths.shape[0]}, {L}); "
                    f"got {tuple(lengths.shape)}."
                )
            lim = lengths[:, qi3.squeeze(-1)].unsqueeze(-1)  # (B, G, R, 1)
        ok = kj3 < lim  # (B, G, R, C)
        return ok.view(ok.shape[0], *([1] * (batch_ndim - 1)), *ok.shape[1:])  # (B, 1.., G, R, C)
    if isinstance(mask, _masks.And):
        return _eval(mask.a, qi3, kj3, L, S, batch_ndim) & _eval(mask.b, qi3, kj3, L, S, batch_ndim)
    if isinstance(mask, _masks.Or):
        return _eval(mask.a, qi3, kj3, L, S, batch_ndim) | _eval(mask.b, qi3, kj3, L, S, batch_ndim)
    if isinstance(mask, _masks.Dense):
        t = mask.tensor.to(qi3.device)
    else:  # Graph and any other mask: materialize once, gather the tiles
        t = mask.materialize(L, S, device=qi3.device, batch_ndim=batch_ndim)
    t = t.expand(*t.shape[:-2], L, S) if t.ndim >= 2 else t.expand(L, S)
    # gather t[..., qi, kj] for every tile: (..., G, R, C)
    return t[..., qi3, kj3]


# ---- tile plans -----------------------------------------------------------------------------------------------

@dataclass
class Group:
    """Query blocks that read the same number of keys, computed together with batched matmuls.

    ``qblocks`` (G,) query block ids; ``kidx`` (G, Kw) key indices of each block, clamped into ``[0, S)``.
    The mask on those keys is given one of two ways:

    * ``allowed`` (*mb, G, Bq, Kw) bool, False on padding (so clamped duplicates weigh nothing); or
    * ``allowed=None`` and the key indices are ``c = Kw / block`` whole key tiles: every tile is fully kept except
      the ``P`` *partial* tiles ``(part_g[p], part_t[p])`` (row of the group, tile position in the row, sorted by
      row), whose forbidden pairs are ``forbid[p]`` (P, *mb, Bq, Bk), ``*mb`` one entry per batch dim. A fully
      kept tile needs no mask at all. Such a group also has ``ktiles`` (G, c), the key tile ids (``kidx`` is
      ``ktiles * block + arange(block)``), so kernels can move whole tiles instead of single rows.
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


@dataclass
class Plan:
    """Where a block-sparse kernel computes: query length L, key length S, block rows, and the groups."""

    L: int
    S: int
    block: int
    groups: list[Group]

    @property
    def pairs(self) -> int:
        """Number of (query, key) pairs the kernel computes scores for (per batch element and head)."""
        return sum(g.kidx.numel() * self.block for g in self.groups)


_TILE_BUDGET = 1 << 24  # mask elements evaluated at once while planning


def plan_from_mask(mask: _masks.Mask, L: int, S: int, *, block: int = 128, batch_ndim: int = 2,
                   device=None) -> Plan:
    """Tile plan of ``mask``: each query block visits the ``block x block`` key tiles that hold a True.

    The candidate tiles come from ``mask.block_mask``; the mask is then evaluated once on each of them, so a tile
    is dropped when it holds no allowed pair (``And`` of block masks over-approximates), kept without any mask
    when every pair is allowed, and kept with its own boolean tile otherwise. Query blocks with the same number
    of tiles form a :class:`Group`.

    The plan is remembered on the mask object for the last (L, S, block, batch_ndim, device) and rebuilt when
    any tensor of the mask is edited in place or replaced.
    """
    key = ("plan", L, S, block, batch_ndim, str(device))
    return cached_on_mask(mask, "_attnkit_plan", key, lambda: _build_plan(mask, L, S, block, batch_ndim, device))


def _build_plan(mask: _masks.Mask, L: int, S: int, block: int, batch_ndim: int, device) -> Plan:
    tiles = cached_block_mask(mask, L, S, block, device)  # (nbq, nbk) candidate tiles
    cand = torch.nonzero(tiles)  # (T, 2): (query block, key block), row-major
    rows = torch.arange(block, device=device)
    T = cand.shape[0]
    state = torch.zeros(T, dtype=torch.int8, device=device)  # 0 empty, 1 partial, 2 full
    forbid_parts, part_ids = [], []
    mb_shape = None
    step = max(1, _TILE_BUDGET // (block * block))
    for a in range(0, T, step):
        c = cand[a : a + step]
        qi = c[:, :1] * block + rows  # (t, Bq)
        kj = c[:, 1:] * block + rows  # (t, Bk)
        ok = mask_on_tiles(mask, qi, kj, L, S, batch_ndim)  # (*mb, t, Bq, Bk), mb empty or batch_ndim dims
        ok = ok.expand(*ok.shape[:-3], c.shape[0], block, block)
        if mb_shape is None:  # the mask's batch dims, one per batch dim of the scores
            mb = tuple(ok.shape[:-3])
            mb_shape = (1,) * max(0, batch_ndim - len(mb)) + mb
        per = ok.reshape(-1, *ok.shape[-3:]).transpose(0, 1).flatten(1)  # (t, mb * Bq * Bk)
        anyk, allk = per.any(1), per.all(1)
        state[a : a + step] = anyk.to(torch.int8) + allk.to(torch.int8)
        part = torch.nonzero(anyk & ~allk).flatten()  # (p,) local ids of partial tiles
        if part.numel():
            f = ~ok.index_select(-3, part).movedim(-3, 0)  # (p, *mb, Bq, Bk)
            forbid_parts.append(f.reshape(part.numel(), *mb_shape, block, block))
            part_ids.append(part + a)
    forbid_all = torch.cat(forbid_parts) if forbid_parts else None  # (P, *mb, Bq, Bk), in tile order
    part_all = torch.cat(part_ids) if part_ids else torch.zeros(0, dtype=torch.long, device=device)
    slot = torch.full((T,), -1, dtype=torch.long, device=device)  # tile -> row of forbid_all
    slot[part_all] = torch.arange(part_all.numel(), device=device)

    live = torch.nonzero(state > 0).flatten()  # (T',) tiles with an allowed pair, still row-major
    qb_of, kb_of = cand[live, 0], cand[live, 1]
    nbq = -(-L // block)
    counts = torch.bincount(qb_of, minlength=nbq)  # (nbq,)
    first = torch.cumsum(counts, 0) - counts  # (nbq,): position of each block's first live tile
    groups = []
    for c in sorted(set(counts.tolist()) - {0}):
        qblocks = torch.nonzero(counts == c).flatten()  # (G,)
        pos = first[qblocks].unsqueeze(-1) + torch.arange(c, device=device)  # (G, c) into live
        kblocks = kb_of[pos]  # (G, c)
        kidx = (kblocks.unsqueeze(-1) * block + rows).flatten(1)  # (G, c * Bk)
        sl = slot[live[pos]]  # (G, c): row in forbid_all or -1
        pg, pt = torch.nonzero(sl >= 0, as_tuple=True)  # sorted by group row
        forbid = forbid_all.index_select(0, sl[pg, pt]) if pg.numel() else None
        groups.append(Group(qblocks, kidx.clamp(0, max(S - 1, 0)), None, pg, pt, forbid, kblocks))
    return Plan(L, S, block, groups)


def cached_block_mask(mask: _masks.Mask, L: int, S: int, block: int, device=None) -> Tensor:
    """``mask.block_mask(L, S, block)`` as bool, remembered on the mask object for the last (L, S, block).

    Dispatch (to measure the density) and the kernel (to plan) both need it; for a dense mask it is a full
    pass over L x S, so it is computed once per mask and shape.
    """
    key = ("tiles", L, S, block, str(device))
    return cached_on_mask(mask, "_attnkit_tiles", key,
                   lambda: mask.block_mask(L, S, block, device=device).to(torch.bool))


def cached_on_mask(mask: _masks.Mask, attr: str, key: tuple, build, keep=None):
    """``build()``, remembered on ``mask.<attr>`` under ``key`` and the identity and version of every tensor of
    the mask (an in-place edit bumps the version; a replaced tensor has another identity: the entry holds the
    old tensors, so their ids cannot be reused while it lives). Any per-mask derived value (tiles, plans, the
    keys no query uses) can be remembered this way. With ``keep``, a value is remembered only if
    ``keep(value)`` is true (e.g. not when it is too large to keep alive)."""
    tensors: list[Tensor] = []
    full_key = (key, _state(mask, tensors))
    hit = getattr(mask, attr, None)
    if hit is not None and hit[0] == full_key:
        return hit[2]
    value = build()
    if keep is not None and not keep(value):
        return value
    try:
        setattr(mask, attr, (full_key, tensors, value))
    except AttributeError:  # a mask class with __slots__: no cache
        pass
    return value


def _state(mask: _masks.Mask, tensors: list[Tensor]) -> tuple:
    """Hashable description of a mask's current contents (tensors by identity and version)."""
    if isinstance(mask, (_masks.And, _masks.Or)):
        return (type(mask).__name__, _state(mask.a, tensors), _state(mask.b, tensors))
    out: list = [type(mask).__name__]
    for name, val in sorted(vars(mask).items()):
        if name.startswith("_attnkit"):
            continue
        if isinstance(val, Tensor):
            tensors.append(val)
            out.append((name, id(val), val._version))
        elif isinstance(val, (int, float, str, bool, type(None))):
            out.append((name, val))
        else:  # an attribute we cannot fingerprint: identity only
            out.append((name, id(val)))
    return tuple(out)
