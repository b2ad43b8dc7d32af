"""The one non-finite rule every backend obeys, applied once in front of them.

* A NaN/inf in a key or value that a query may not see never reaches that query's output or any gradient:
  such key/value rows are replaced by zeros before the kernel runs (``0 * NaN`` in ``P V`` would otherwise leak
  into every row of the tile), and the rows that *may* see one get NaN as their output (and log-sum-exp),
  as the equation gives them.
* A NaN in a query row that may attend to no key (a padded row) does not poison other rows' gradients: the row
  is replaced by zeros (its output is zero anyway).

With finite inputs (the usual case) this costs one min/max pass over q, k and v and changes nothing. It
is skipped while tracing (``torch.compile`` / ``torch.export``), where inputs are symbolic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.masks import Mask, allowed_on


def _bad_rows(x: Tensor) -> Tensor:
    """(..., N, 1): rows holding a NaN or inf."""
    return ~torch.isfinite(x).all(-1, keepdim=True)


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite: one min/max reduction (NaN and inf reach the min or the max), 20x
    cheaper than ``isfinite(x).all()``, which writes a bool tensor of ``x``'s size."""
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def guard(query: Tensor, key: Tensor, value: Tensor, mask: Mask | None):
    """``(query, key, value, seen)``: inputs made safe for the kernels, and ``seen`` (..., L, 1) bool, the query
    rows that may see a non-finite key or value (their outputs become NaN), or None."""
    if mask is None or not all(t.numel() for t in (query, key, value)):
        return query, key, value, None
    if _all_finite(query) and _all_finite(key) and _all_finite(value):
        return query, key, value, None
    L, S = query.shape[-2], key.shape[-2]
    nd = max(query.ndim, key.ndim) - 2
    bad_kv = _bad_rows(key) | _bad_rows(value)  # (..., S, 1)
    seen = None
    if bool(bad_kv.any()):
        cols = torch.nonzero(bad_kv.reshape(-1, S).any(0)).flatten()  # keys that are bad somewhere
        qi = torch.arange(L, device=query.device).unsqueeze(0)  # (1, L)
        ok = allowed_on(mask, qi, cols.unsqueeze(0), L, S, nd).squeeze(-3)  # (*mb, L, n): may see a bad key
        bad_here = bad_kv.squeeze(-1)[..., cols].unsqueeze(-2)  # (..., 1, n)
        seen = (ok & bad_here).any(-1, keepdim=True)  # (..., L, 1)
        key = key.masked_fill(bad_kv, 0.0)
        value = value.masked_fill(bad_kv, 0.0)
    bad_q = _bad_rows(query)
    if bool(bad_q.any()):
        rows = torch.nonzero(bad_q.reshape(-1, L).any(0)).flatten()
        kj = torch.arange(S, device=query.device).unsqueeze(0)  # (1, S)
        ok = allowed_on(mask, rows.unsqueeze(0), kj, L, S, nd).squeeze(-3)  # (*mb, n, S)
        empty = torch.zeros(ok.shape[:-2] + (L, 1), dtype=torch.bool, device=query.device)
        empty[..., rows, :] = ~ok.any(-1, keepdim=True)  # (*mb, L, 1): bad rows that see no key
        query = query.masked_fill(empty & bad_q, 0.0)
    return query, key, value, seen


def poison(seen: Tensor | None, out: Tensor, weights: Tensor | None, lse: Tensor | None):
    """NaN on the rows ``seen`` (which may see a non-finite key or value)."""
    if seen is None:
        return out, weights, lse
    nan = float("nan")
    out = out.masked_fill(seen, nan)
    if weights is not None and not weights.is_sparse:
        weights = weights.masked_fill(seen, nan)
    if lse is not None:
        lse = lse.masked_fill(seen.squeeze(-1), nan)
    return out, weights, lse
