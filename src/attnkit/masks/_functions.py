"""Masks from index functions: FlexAttention's ``mask_mod``, packed documents, 2-D neighbourhoods.

Shape letters: G tiles, R query rows per tile, C key columns per tile, B batch, H heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnkit._checks import check_int, check_tensor
from attnkit.masks._base import Mask, range_min_max, states_of
from attnkit.masks._intervals import classify
from attnkit.masks._structured import _lengths_tensor


class MaskMod(Mask):
    """A mask given by a function ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` (True = may attend), written
    with tensor operations as in FlexAttention (it is called on broadcastable index tensors, never per pair).

    ``B`` / ``H``: how many batch elements and heads the function distinguishes (1 = the same for all, as
    FlexAttention's ``None``). Captured tensors are read where the function indexes them (document ids).
    Tiles are classified from index intervals when the function uses only integer arithmetic, comparisons and
    indexing (:mod:`attnkit.masks._intervals`), else evaluated tile by tile.
    """

    def __init__(self, mask_mod: Callable, B: int | None = None, H: int | None = None):
        if not callable(mask_mod):
            raise TypeError("mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool; got "
                            f"{type(mask_mod).__name__}.")
        self.mask_mod = mask_mod
        self.B = 1 if B is None else check_int("B", B, minimum=1)
        self.H = 1 if H is None else check_int("H", H, minimum=1)
        self.batched = self.B > 1

    def allowed(self, qi, kj, L, S, batch_ndim):
        dev = qi.device
        if batch_ndim >= 2:
            b = torch.arange(self.B, device=dev).view(self.B, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
            h = torch.arange(self.H, device=dev).view(1, self.H, 1, 1, 1)  # (1, H, 1, 1, 1)
        else:
            if self.H > 1:
                raise ValueError(f"mask_mod distinguishes H={self.H} heads, but the scores have no head dimension.")
            b = torch.arange(self.B, device=dev).view(self.B, 1, 1, 1)
            h = torch.zeros((), dtype=torch.long, device=dev)
        out = self.mask_mod(b, h, qi, kj)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            got = out.dtype if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"mask_mod must return a bool tensor (True = may attend); got {got}.")
        # on the indices' device even when the mod returns a constant made elsewhere (torch.tensor(True): CPU)
        out = torch.broadcast_to(out.to(dev), torch.broadcast_shapes(out.shape, qi.shape, kj.shape))  # (*mb, G, R, C)
        if out.ndim > 3 and batch_ndim > 2:  # extra leading batch dims of the scores
            out = out.reshape(*([1] * (batch_ndim - 2)), *out.shape)
        return out

    def tile_states(self, q0, q1, k0, k1, L, S):
        states = classify(self.mask_mod, self.B, self.H, q0, q1, k0, k1)
        return super().tile_states(q0, q1, k0, k1, L, S) if states is None else states

    def check(self, scores_shape):
        if len(scores_shape) >= 4:
            b, h = scores_shape[-4], scores_shape[-3]
            if self.B not in (1, b) or self.H not in (1, h):
                raise ValueError(
                    f"mask_mod was made for B={self.B}, H={self.H}; the scores have B={b}, H={h} "
                    "(use B=None / H=None to broadcast)."
                )

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", type(self.mask_mod).__name__)
        return f"mask_mod({name}, B={self.B}, H={self.H})"


class Documents(Mask):
    """Packed sequences: query ``i`` may attend to key ``j`` iff both belong to the same document.

    ``ids`` ``(L,)`` or ``(B, L)``: the document of each position (self-attention: ``L == S``); a negative id
    is padding (attends nothing, is seen by nothing). Combine with ``causal()`` for packed causal LMs.
    """

    def __init__(self, ids: Tensor):
        ids = _lengths_tensor("ids", ids)
        check_tensor("ids", ids, ndim=(1, 2), hint="Expected (L,) or (B, L) document ids.")
        self.ids = ids.long()
        self.batched = ids.ndim == 2

    def _check_len(self, L: int, S: int) -> None:
        n = self.ids.shape[-1]
        if L != n or S != n:
            raise ValueError(f"document ids cover {n} positions, so L and S must be {n}; got L={L}, S={S}.")

    def allowed(self, qi, kj, L, S, batch_ndim):
        self._check_len(L, S)
        ids = self.ids.to(qi.device)
        dq, dk = ids[..., qi], ids[..., kj]  # (..., G, R, 1), (..., G, 1, C)
        ok = (dq == dk) & (dq >= 0)
        if ids.ndim == 2:
            ok = ok.reshape(ok.shape[0], *([1] * (batch_ndim - 1)), *ok.shape[1:])
        return ok

    def tile_states(self, q0, q1, k0, k1, L, S):
        self._check_len(L, S)
        ids = self.ids.to(q0.device)
        ids = ids if ids.ndim == 2 else ids.unsqueeze(0)  # (B, L)
        qmin, qmax = range_min_max(ids, q0, q1)  # (B, nq)
        kmin, kmax = range_min_max(ids, k0, k1)  # (B, nk)
        some = (qmax[:, :, None] >= kmin[:, None, :]) & (kmax[:, None, :] >= qmin[:, :, None])
        some &= (qmax >= 0)[:, :, None]
        one = ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :] & (qmin[:, :, None] == kmin[:, None, :])
               & (qmin >= 0)[:, :, None])
        return states_of(some.any(0), one.all(0))

    def unused_keys(self, L, S, batch_ndim, device=None):
        self._check_len(L, S)
        pad = self.ids.to(device) < 0  # (..., S)
        if not bool(pad.any()):
            return None
        if pad.ndim == 2:
            pad = pad.reshape(pad.shape[0], *([1] * (batch_ndim - 1)), S)
        return pad.unsqueeze(-1)  # (..., S, 1)

    def check(self, scores_shape):
        self._check_len(*scores_shape[-2:])
        if self.ids.ndim == 2 and (len(scores_shape) < 3 or scores_shape[0] not in (1, self.ids.shape[0])):
            raise ValueError(f"document ids for batch {self.ids.shape[0]} do not fit scores {scores_shape}.")

    def __repr__(self) -> str:
        return f"documents(ids={tuple(self.ids.shape)})"


def documents(lengths: Tensor | list[int] | None = None, *, ids: Tensor | None = None, total: int | None = None
              ) -> Documents:
    """Packed documents from their ``lengths`` ``(D,)`` (positions past their sum, up to ``total``, are padding)
    or from per-position document ``ids`` ``(L,)`` / ``(B, L)``."""
    if (lengths is None) == (ids is None):
        raise ValueError("documents() needs exactly one of lengths=(D,) or ids=(L,)/(B, L).")
    if ids is not None:
        return Documents(ids)
    lengths = _lengths_tensor("lengths", lengths)
    check_tensor("lengths", lengths, ndim=1, hint="Expected (D,) document lengths.")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"document lengths must be >= 0; got min {int(lengths.min())}.")
    doc = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths)
    n = int(doc.shape[0])
    if total is not None:
        check_int("total", total, minimum=n)
        doc = torch.cat([doc, doc.new_full((total - n,), -1)])
    return Documents(doc)


class Neighborhood(Mask):
    """2-D neighbourhood attention over a ``height x width`` grid flattened row-major (NATTEN): query ``(x, y)``
    sees the ``kernel x kernel`` keys around it, the window shifted inward at the borders so every query sees
    ``kernel^2`` keys; with ``dilation`` d, the neighbours are every d-th position (same residue mod d);
    ``causal=True`` keeps only keys at or before the query along each axis (the window ends at the query).
    ``shift=False`` truncates the window at the borders instead (the receptive field of a ``kernel x kernel``
    convolution with 'same' padding: border queries see fewer keys)."""

    def __init__(self, height: int, width: int, kernel: int | tuple[int, int], *,
                 dilation: int | tuple[int, int] = 1, causal: bool = False, shift: bool = True):
        self.height, self.width = check_int("height", height, minimum=1), check_int("width", width, minimum=1)
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
        self.kernel = (check_int("kernel", kh, minimum=1), check_int("kernel", kw, minimum=1))
        self.dilation = (check_int("dilation", dh, minimum=1), check_int("dilation", dw, minimum=1))
        for name, n, k, d in (("height", height, kh, dh), ("width", width, kw, dw)):
            if not causal and k % 2 == 0:
                raise ValueError(f"kernel must be odd (a window centred on the query); got {k}.")
            if shift and k * d > n:
                raise ValueError(f"kernel * dilation = {k * d} must be <= {name} = {n}.")
        self.causal, self.shift = bool(causal), bool(shift)

    def _axis(self, q: Tensor, k: Tensor, n: int, kern: int, d: int) -> Tensor:
        g = q % d  # dilation group of the query
        same = (k % d) == g
        qg, kg = q // d, k // d  # coordinates inside the group
        if self.causal:
            return same & (kg <= qg) & (kg > qg - kern)
        r = kern // 2
        if not self.shift:
            return same & ((qg - kg).abs() <= r)
        size = (n - g + d - 1) // d  # positions in the group
        centre = torch.minimum(torch.maximum(qg, torch.full_like(qg, r)), size - 1 - r)
        return same & ((centre - kg).abs() <= r)

    def allowed(self, qi, kj, L, S, batch_ndim):
        self._check_len(L, S)
        W = self.width
        rows = self._axis(qi // W, kj // W, self.height, self.kernel[0], self.dilation[0])
        cols = self._axis(qi % W, kj % W, self.width, self.kernel[1], self.dilation[1])
        return rows & cols

    def _row_reach(self, device) -> tuple[Tensor, Tensor]:
        """For every grid row x: the first and last key row it may see (ignoring the dilation residue)."""
        x = torch.arange(self.height, device=device)
        k, d = self.kernel[0], self.dilation[0]
        if self.causal:
            return x - (k - 1) * d, x
        g, xg = x % d, x // d
        size = (self.height - g + d - 1) // d
        r = k // 2
        if not self.shift:
            return x - r * d, x + r * d
        centre = torch.minimum(torch.maximum(xg, torch.full_like(xg, r)), size - 1 - r)
        return (centre - r) * d + g, (centre + r) * d + g

    def tile_states(self, q0, q1, k0, k1, L, S):
        self._check_len(L, S)
        W = self.width
        first, last = self._row_reach(q0.device)
        lo, _ = range_min_max(first, q0 // W, q1 // W)  # (nq,)
        _, hi = range_min_max(last, q0 // W, q1 // W)
        some = (k1[None, :] // W >= lo[:, None]) & (k0[None, :] // W <= hi[:, None])
        return some.to(torch.int8)  # never certainly full: 0 or unknown

    def _check_len(self, L: int, S: int) -> None:
        n = self.height * self.width
        if L != n or S != n:
            raise ValueError(f"a {self.height} x {self.width} grid has {n} positions, so L and S must be {n}; "
                             f"got L={L}, S={S}.")

    def check(self, scores_shape):
        self._check_len(*scores_shape[-2:])

    def __repr__(self) -> str:
        return (f"neighborhood({self.height}, {self.width}, kernel={self.kernel}, dilation={self.dilation}"
                f"{', causal=True' if self.causal else ''}{', shift=False' if not self.shift else ''})")


class _Preplanned(MaskMod):
    """A ``mask_mod`` whose tile states are already known (a BlockMask made by torch's ``create_block_mask``)."""

    def __init__(self, mask_mod, B, H, states: Tensor, L: int, S: int, block: int):
        super().__init__(mask_mod, B, H)
        self.known, self.L, self.S, self.block = states, L, S, block

    def tile_states(self, q0, q1, k0, k1, L, S):
        standard = (L, S) == (self.L, self.S) and q0.shape[0] == self.known.shape[0] and \
            k0.shape[0] == self.known.shape[1] and (q0.shape[0] < 2 or int(q0[1] - q0[0]) == self.block)
        if standard and bool((q0 == torch.arange(q0.shape[0], device=q0.device) * self.block).all()):
            return self.known.to(q0.device)
        return super().tile_states(q0, q1, k0, k1, L, S)


def from_torch_block_mask(bm) -> Mask:
    """The attnkit plan of a ``torch.nn.attention.flex_attention.BlockMask``: its ``mask_mod`` and tile lists
    (full tiles from ``full_kv_indices``, partial ones from ``kv_indices``; union over batch and heads)."""
    bq, bk = bm.BLOCK_SIZE if isinstance(bm.BLOCK_SIZE, tuple) else (bm.BLOCK_SIZE, bm.BLOCK_SIZE)
    if bq != bk:
        raise ValueError(f"attnkit plans square tiles; this BlockMask has BLOCK_SIZE=({bq}, {bk}).")
    L, S = bm.seq_lengths
    B, H, nq = bm.kv_num_blocks.shape
    nk = -(-S // bk)

    def dense(num: Tensor | None, idx: Tensor | None) -> Tensor:
        out = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=bm.kv_num_blocks.device)
        if num is None:
            return out[..., :nk]
        valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)  # (B, H, nq, K)
        out.scatter_(-1, torch.where(valid, idx, nk).long(), True)
        return out[..., :nk]

    part, full = dense(bm.kv_num_blocks, bm.kv_indices), dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    some = (part | full).flatten(0, 1).any(0)  # (nq, nk)
    every = full.flatten(0, 1).all(0)
    states = (some.to(torch.int8) + every.to(torch.int8)).cpu()
    return _Preplanned(bm.mask_mod, B, H, states, L, S, bq).plan(L, S, bq, batch_ndim=2,
                                                                  device=bm.kv_num_blocks.device)
