"""The non-finite rule of :mod:`attnkit.functional._nonfinite` across ranks, so the ring means what one process
means: a NaN/inf in a key or value that a query may not see never reaches that query's output or any gradient.

Every rank checks its own slices (one ``isfinite`` pass) and the ranks agree on one flag; with finite inputs (the
usual case) that is all. Otherwise the ranks share where their bad key/value rows are (global positions, per
batch and key/value head), each rank zeroes its own bad rows before they travel (``0 * NaN`` in ``P V`` would
reach every row of a block), marks its query rows that may see one of them (their outputs and lse become NaN, as
the equation gives), and zeroes its non-finite query rows that may see no key at all (their output is zero anyway,
and a NaN there would poison the key gradients of the block).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit.masks import Mask, allowed_on


def _positions(segs: list[tuple[int, int]], device) -> Tensor:
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in segs])


def _bad_rows(x: Tensor) -> Tensor:
    """(B, H, n): rows holding a NaN or inf."""
    return ~torch.isfinite(x).all(-1)


def guard(query: Tensor, key: Tensor, value: Tensor, mask: Mask, q_segs: list, k_segs: list, rank: int, L: int,
          S: int, group) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(query, key, value, seen)``: this rank's inputs made safe, and ``seen`` ``(B, Hq, L_r, 1)``, its query rows
    that may see a non-finite key or value anywhere on the ring (None when there are none).

    Shape:
        query ``(B, Hq, L_r, D)``, key ``(B, Hkv, S_r, D)``, value ``(B, Hkv, S_r, Dv)``.
    """
    bad_kv = _bad_rows(key) | _bad_rows(value)  # (B, Hkv, S_r)
    bad_q = _bad_rows(query)  # (B, Hq, L_r)
    flag = torch.tensor([int(bool(bad_kv.any())), int(bool(bad_q.any()))], dtype=torch.int64, device=query.device)
    dist.all_reduce(flag, group=group)  # (2,): how many ranks hold a bad key/value row, a bad query row
    if not bool(flag.any()):
        return query, key, value, None
    B, Hq, nq = query.shape[:3]
    Hkv = key.shape[1]
    qi = _positions(q_segs[rank], query.device)  # (L_r,) global query positions
    seen = None
    if int(flag[0]):
        kpos = _positions(k_segs[rank], key.device)
        b, h, j = torch.nonzero(bad_kv, as_tuple=True)
        mine = torch.stack([b, h, kpos[j]], 1).cpu()  # (n, 3): batch, kv head, global key position
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine.tolist(), group=group)
        found = torch.tensor([t for part in every for t in part], dtype=torch.long, device=query.device)  # (n, 3)
        cols = found[:, 2].unique()
        ok = allowed_on(mask, qi.unsqueeze(0), cols.unsqueeze(0), L, S, 2).squeeze(-3)  # (B|1, H|1, L_r, n)
        ok = ok.expand(B, Hq, nq, cols.numel())
        bad = torch.zeros(B, Hkv, cols.numel(), dtype=torch.bool, device=query.device)
        bad[found[:, 0], found[:, 1], torch.searchsorted(cols, found[:, 2])] = True
        bad = bad.repeat_interleave(Hq // Hkv, dim=1).unsqueeze(-2)  # (B, Hq, 1, n): query head -> its kv head
        seen = (ok & bad).any(-1, keepdim=True)  # (B, Hq, L_r, 1)
        key = key.masked_fill(bad_kv.unsqueeze(-1), 0.0)
        value = value.masked_fill(bad_kv.unsqueeze(-1), 0.0)
    if bool(bad_q.any()):
        rows = torch.nonzero(bad_q.any(0).any(0)).flatten()  # local rows bad somewhere
        kj = torch.arange(S, device=query.device).unsqueeze(0)  # (1, S): every key of the ring
        sees = allowed_on(mask, qi[rows].unsqueeze(0), kj, L, S, 2).squeeze(-3).any(-1)  # (B|1, H|1, n)
        blind = torch.zeros(B, Hq, nq, dtype=torch.bool, device=query.device)
        blind[:, :, rows] = ~sees.expand(B, Hq, rows.numel())
        query = query.masked_fill((blind & bad_q).unsqueeze(-1), 0.0)
    return query, key, value, seen
