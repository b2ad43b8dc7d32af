"""Attention weights in the explorer's compact form: per head, the kept keys of each query row (CSR).

What comes in is what attnkit and other libraries return:

- a dense tensor ``(T, S)``, ``(H, T, S)`` or ``(B, H, T, S)`` (``batch_index`` picks one);
- a torch sparse COO tensor of those shapes (the layout of ``attention(..., return_weights="sparse")``): it is
  never densified, rows are ranked from its stored entries only;
- a list or tuple over layers of either (Hugging Face's ``output_attentions`` is a tuple over layers of
  ``(B, H, T, S)`` tensors).

Each query row keeps its ``top_k`` largest weights that are at least ``threshold``; values are rounded to
``decimals`` and stored as integers (``round(w * 10**decimals)``), so the page's JSON is compact.

Letters: ``H`` heads, ``T`` queries (rows), ``S`` keys (columns), ``N`` kept entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HeadRows:
    """One head's kept weights as CSR: row ``t`` owns ``cols[ptr[t]:ptr[t + 1]]`` and ``vals[...]``.

    ``vals`` are integers, weight = ``val / 10**decimals``.
    """

    ptr: list[int]
    cols: list[int]
    vals: list[int]


@dataclass
class Layer:
    """The heads of one attention layer, their shape ``(T, S)``, and what the thinning kept."""

    heads: list[HeadRows]
    shape: tuple[int, int]
    kept: int  # entries kept
    stored: int  # nonzero entries the input held (T * S * H for a dense input without zeros)
    mass_kept: float  # sum of the kept weights / sum of all weights (1.0 = nothing lost)


def as_layers(name: str, weights, *, batch_index: int = 0) -> list[Tensor]:
    """Turn ``weights`` (a tensor or a list/tuple over layers) into a list of ``(H, T, S)`` tensors.

    Sparse COO tensors stay sparse. Raises ``TypeError``/``ValueError`` naming ``name``.
    """
    items = list(weights) if isinstance(weights, list | tuple) else [weights]
    if not items:
        raise ValueError(f"{name} must hold at least one layer; got an empty {type(weights).__name__}")
    out = []
    for i, w in enumerate(items):
        where = f"{name}[{i}]" if isinstance(weights, list | tuple) else name
        if not isinstance(w, Tensor):
            raise TypeError(f"{where} must be a torch.Tensor (dense or sparse COO) of shape (T, S), (H, T, S) or "
                            f"(B, H, T, S); got {type(w).__name__}")
        if w.layout not in (torch.strided, torch.sparse_coo):
            raise TypeError(f"{where} must be dense or sparse COO; got layout {w.layout}. Convert with "
                            ".to_sparse_coo() or .to_dense()")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{where} must be a floating-point tensor; got {w.dtype}")
        if w.dim() == 4:
            if not -w.shape[0] <= batch_index < w.shape[0]:
                raise ValueError(f"batch_index must be in [0, {w.shape[0]}) for {where} of shape {tuple(w.shape)}; "
                                 f"got {batch_index}")
            w = _select(w, batch_index % w.shape[0])  # (H, T, S)
        elif w.dim() == 2:
            w = w.unsqueeze(0)  # (1, T, S)
        elif w.dim() != 3:
            raise ValueError(f"{where} must be (T, S), (H, T, S) or (B, H, T, S); got shape {tuple(w.shape)}")
        out.append(w.detach().cpu())
    return out


def _select(w: Tensor, b: int) -> Tensor:
    """Batch row ``b`` of a dense or sparse ``(B, H, T, S)`` tensor, as ``(H, T, S)`` of the same layout."""
    if w.layout == torch.strided:
        return w[b]
    w = w.coalesce()
    idx, val = w.indices(), w.values()  # (4, N), (N,)
    keep = idx[0] == b
    return torch.sparse_coo_tensor(idx[1:, keep], val[keep], w.shape[1:], is_coalesced=True,
                                   check_invariants=False)


def compact(w: Tensor, *, top_k: int | None, threshold: float, decimals: int) -> Layer:
    """Keep, per query row of each head of ``w (H, T, S)``, the ``top_k`` largest weights >= ``threshold``.

    ``top_k=None`` keeps every weight >= ``threshold``. A sparse ``w`` is ranked from its stored entries (no
    ``(T, S)`` tensor is made). Weights are expected in [0, 1]: negative ones are never kept.

    Shape:
        - w: ``(H, T, S)``, dense or sparse COO; returns per head CSR rows of ``N_h`` kept entries
    """
    H, T, S = w.shape
    scale = 10.0 ** decimals
    values = w.coalesce().values() if w.layout == torch.sparse_coo else w
    if not bool(torch.isfinite(values).all()):
        raise ValueError("weights must be finite; got NaN or infinite values (a fully masked row should hold zeros, "
                         "see attnkit.functional.softmax)")
    if w.layout == torch.sparse_coo:
        w = w.coalesce()
        idx, val = w.indices(), w.values().float()  # (3, N), (N,)
        stored, total = int(val.numel()), float(val.sum())
        row = idx[0] * T + idx[1]  # (N,) flat (head, query) row
        col = idx[2]
        # rank inside each row: sort by value (descending), then stably by row
        order = torch.sort(val, descending=True, stable=True).indices
        order = order[torch.sort(row[order], stable=True).indices]
        row, col, val = row[order], col[order], val[order]
        counts = torch.bincount(row, minlength=H * T)  # (H*T,)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(row.numel()) - starts[row]
        keep = val >= threshold
        if top_k is not None:
            keep &= rank < top_k
        row, col, val = row[keep], col[keep], val[keep]
    else:
        w = w.float()
        stored, total = int((w != 0).sum()), float(w.sum())
        k = S if top_k is None else min(top_k, S)
        if k < S:
            val, col = w.topk(k, dim=-1)  # (H, T, k)
        else:
            val = w
            col = torch.arange(S).expand(H, T, S)
        row = torch.arange(H * T).view(H, T, 1).expand_as(col)  # (H, T, k)
        keep = val >= threshold
        row, col, val = row[keep], col[keep], val[keep]  # (N,) in row-major order
    kept_mass = float(val.sum())
    q = torch.round(val * scale).to(torch.int64)
    nz = q > 0  # a weight that rounds to 0 is not worth a byte
    row, col, q = row[nz], col[nz], q[nz]
    counts = torch.bincount(row, minlength=H * T).view(H, T)  # (H, T)
    heads = []
    offset = 0
    for h in range(H):
        n = int(counts[h].sum())
        ptr = [0, *torch.cumsum(counts[h], 0).tolist()]
        heads.append(HeadRows(ptr, col[offset: offset + n].tolist(), q[offset: offset + n].tolist()))
        offset += n
    return Layer(heads, (T, S), kept=int(q.numel()), stored=stored,
                 mass_kept=kept_mass / total if total > 0 else 1.0)


def entries(w: Tensor) -> int:
    """How many weights ``w`` holds: its stored entries when sparse, every element when dense."""
    return w._nnz() if w.layout == torch.sparse_coo else w.numel()


def auto_top_k(rows: int, stored: int, max_entries: int) -> int | None:
    """The ``top_k`` that keeps about ``max_entries`` of ``stored`` weights over ``rows`` query rows
    (``None``: keep them all)."""
    if stored <= max_entries:
        return None
    return max(1, max_entries // max(rows, 1))
