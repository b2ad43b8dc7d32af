"""Evaluate an attnkit mask on gathered (query, key) index tiles, without building the L x S tensor.

Kernels that work block by block need the mask only where they compute scores. ``mask_on_tiles`` answers
"may query ``qi[g, r]`` attend to key ``kj[g, c]``?" for every tile ``g``, from the mask's closed form
(``Full``, ``Window``/``Causal``, ``Padding``, ``And``/``Or`` of those) or by gathering from the dense tensor
(``Dense``). Other masks (``Graph``, user subclasses) are materialized once and gathered from.

Shape letters: G tiles, R query rows per tile, C key columns per tile, ``*mb`` the mask's batch dims.
"""

from __future__ import annotations

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
