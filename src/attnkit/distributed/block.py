"""One block of ring attention (a query segment against a key range): forward through
:func:`attnkit.functional.attention`, the log-sum-exp merge, and the backward from the *global* out and lse.

Forward of a block ``(Q_i, K_j, V_j)`` gives ``O_ij`` and ``lse_ij``; blocks merge as

    lse = log(sum_j exp(lse_ij)) ;  O = sum_j exp(lse_ij - lse) O_ij

Backward (FlashAttention-2's, with the global ``lse`` and ``O`` of the query rows, so each block's gradient is
its exact share):

    P = exp(scale Q K^T - lse) ;  dV = P^T dO ;  dP = dO V^T ;  dS = P (dP - rowsum(dO O))
    dQ = scale dS K ;  dK = scale dS^T Q

computed with plain torch ops on chunks of query rows, each against the hull of the keys its rows may see.
Grouped-query attention: query head ``h`` uses key/value head ``h // (Hq / Hkv)`` (``repeat_interleave``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.functional import attention
from attnkit.masks import Mask

_BUDGET = 1 << 20  # score elements per backward chunk (4 MiB in float32)


def block_forward(q: Tensor, k: Tensor, v: Tensor, mask: Mask, q0: int, k0: int, L: int, S: int,
                  scale: float) -> tuple[Tensor, Tensor]:
    """``(O_ij, lse_ij)`` of queries at global ``q0...`` against keys at global ``k0...``.

    Shape:
        q ``(B, Hq, l, D)``, k ``(B, Hkv, s, D)``, v ``(B, Hkv, s, Dv)`` -> ``(B, Hq, l, Dv)``, ``(B, Hq, l)``.
    """
    # the tiled kernel runs any plan with its lse; auto takes blocksparse for a shard of a window, 3.7x slower
    # (1 x 4 x 16384 x 64, window 128); below 128 x 128 pairs auto's plain paths are faster
    backend = "tiled" if q.shape[-2] * k.shape[-2] >= 128 * 128 else "auto"
    return attention(q, k, v, mask=mask.offset(q0, k0, L=L, S=S), scale=scale, return_lse=True, backend=backend)


def merge(out: Tensor | None, lse: Tensor | None, o: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """Merge a block's ``(o, l)`` into the running ``(out, lse)`` by log-sum-exp (empty rows: -inf, zeros)."""
    if out is None:
        return o, l
    new = torch.logaddexp(lse, l)  # (B, H, l)
    ok = torch.isfinite(new)
    wa = torch.where(ok, torch.exp(lse - new), 0.0).unsqueeze(-1)  # (B, H, l, 1)
    wb = torch.where(ok, torch.exp(l - new), 0.0).unsqueeze(-1)
    return out * wa.to(out.dtype) + o * wb.to(o.dtype), new


def _chunk_rows(nq: int, ns: int, heads: int, band: tuple[int, int] | None, tile: int) -> int:
    """Query rows per backward chunk: ``rows x width`` scores per head within the budget, with ``width`` the
    keys a chunk may see (``rows + left + right`` plus a tile each side for a band, else all ``ns``); for a band
    about its width (fewer rows waste less of the rectangle, more rows cost more Python steps)."""
    per_head = _BUDGET // max(1, heads)
    if band is None:
        return max(16, min(nq, per_head // max(1, ns)))
    w = min(ns, band[0] + band[1] + 1 + 2 * tile)
    most = int((-w + math.sqrt(w * w + 4 * per_head)) / 2)  # rows * (rows + w) = per_head
    # about as many rows as the band is wide: the chunk's dense rows x (rows + w) rectangle stays mostly band
    return max(16, min(nq, most, max(64, w)))


def block_backward(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, dout: Tensor, delta: Tensor, mask: Mask,
                   q0: int, k0: int, L: int, S: int, scale: float, key_range, band, tile: int,
                   dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Add ``(dQ, dK, dV)`` of one block into ``dq``, ``dk``, ``dv`` (views of the rank's gradients), given the
    global ``lse`` and ``delta = rowsum(dO O)`` of its query rows.

    ``key_range(q0, q1, k0, k1)`` bounds the keys a chunk of query rows may see (the schedule's rule); ``band``
    and ``tile`` (the mask's band and the schedule's tile side) size the chunks.

    Shape:
        q ``(B, Hq, l, D)``, k ``(B, Hkv, s, D)``, v ``(B, Hkv, s, Dv)``, lse/delta ``(B, Hq, l)``,
        dout ``(B, Hq, l, Dv)``; dq like q, dk like k, dv like v.
    """
    B, Hq, nq, D = q.shape
    Hkv, ns, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    lse = torch.where(torch.isfinite(lse), lse, float("inf"))  # empty rows: P = 0
    rows = _chunk_rows(nq, ns, B * Hq, band, tile)
    for c0 in range(0, nq, rows):
        c1 = min(nq, c0 + rows)
        rng = key_range(q0 + c0, q0 + c1, k0, k0 + ns)
        if rng is None:
            continue
        a, b = rng[0] - k0, rng[1] - k0
        c, n = c1 - c0, b - a
        qc = q[:, :, c0:c1].reshape(B, Hkv, G, c, D)  # (B, Hkv, G, c, D)
        kc, vc = k[:, :, None, a:b], v[:, :, None, a:b]  # (B, Hkv, 1, n, D), (B, Hkv, 1, n, Dv)
        doc = dout[:, :, c0:c1].reshape(B, Hkv, G, c, Dv)
        m = mask.offset(q0 + c0, k0 + a, L=L, S=S).materialize(c, n, device=q.device, batch_ndim=2)
        if m.ndim == 4:  # (B|1, H|1, c, n) -> (B|1, Hkv, G, c, n)
            m = m.expand(m.shape[0], Hq, c, n).reshape(m.shape[0], Hkv, G, c, n)
        # S = scale Q K^T ; P = exp(S - lse)
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, Hkv, G, c, n)
        p = torch.exp(s - lse[:, :, c0:c1].reshape(B, Hkv, G, c, 1))
        p = torch.where(m, p, 0.0)
        # dV = P^T dO
        dv[:, :, a:b] += torch.matmul(p.transpose(-1, -2), doc).sum(2)  # (B, Hkv, n, Dv)
        # dS = P (dO V^T - rowsum(dO O))
        ds = p * (torch.matmul(doc, vc.transpose(-1, -2)) - delta[:, :, c0:c1].reshape(B, Hkv, G, c, 1))
        # dQ = scale dS K ; dK = scale dS^T Q
        dq[:, :, c0:c1] += (torch.matmul(ds, kc) * scale).reshape(B, Hq, c, D)
        dk[:, :, a:b] += torch.matmul(ds.transpose(-1, -2), qc).sum(2) * scale  # (B, Hkv, n, D)
