"""FlexAttention's API on attnkit's kernels: eager on any device, with backward on the CPU.

Code written for ``torch.nn.attention.flex_attention`` ports by changing one import::

    from attnkit.flex import flex_attention, create_block_mask      # was: from torch.nn.attention.flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)                  # slopes: (H,), learnable: gets a gradient

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=L, KV_LEN=L)
    out = flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask)
    out.sum().backward()                                            # FlexAttention refuses this on a CPU

Arguments and meaning are torch's (B/H of ``None`` broadcast; ``scale`` defaults to ``1/sqrt(E)`` and is applied
before ``score_mod``; the log-sum-exp is the natural log, ``-inf`` for a row with no allowed key). What differs:
no compilation (nothing to warm up, any length without recompiling); ``create_block_mask`` plans the mask a tile
at a time from index intervals and never builds ``Q_LEN x KV_LEN``; a fully masked row gives zeros (as torch).
A ``BlockMask`` made by torch's own ``create_block_mask`` is accepted too. ``kernel_options`` are accepted and
ignored (they tune Triton kernels).

Shape:
    query ``(B, Hq, L, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)`` -> ``(B, Hq, L, Ev)``; lse
    ``(B, Hq, L)``.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit import masks as _masks
from attnkit.functional.attention import attention

__all__ = ["flex_attention", "create_block_mask", "create_mask", "and_masks", "or_masks", "noop_mask",
           "AuxRequest", "AuxOutput", "BlockMask"]

BlockMask = _masks.BlockMask


@dataclass(frozen=True)
class AuxRequest:
    """Which auxiliary outputs ``flex_attention`` should return (torch 2.13's ``AuxRequest``)."""

    lse: bool = False
    max_scores: bool = False


@dataclass(frozen=True)
class AuxOutput:
    """Auxiliary outputs of ``flex_attention``: fields not requested are None."""

    lse: Tensor | None = None
    max_scores: Tensor | None = None


def noop_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Every pair allowed."""
    return torch.tensor(True)


def and_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod allowing a pair iff every one of ``mask_mods`` does."""
    return _fold("and_masks", operator.and_, True, mask_mods)


def or_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod allowing a pair iff any of ``mask_mods`` does."""
    return _fold("or_masks", operator.or_, False, mask_mods)


def _fold(name: str, op: Callable, start: bool, mask_mods: tuple) -> Callable:
    """The mask_mod ``start op m1(...) op m2(...) ...`` of ``mask_mods``."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError(f"{name} takes mask_mod callables (b, h, q_idx, kv_idx) -> bool.")

    def combined(b, h, q_idx, kv_idx):
        out = torch.tensor(start)
        for m in mask_mods:
            out = op(out, m(b, h, q_idx, kv_idx))
        return out

    combined.__name__ = name.replace("_masks", "_mask")
    return combined


def _check_len(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; got {value!r}.")
    return value


def _check_bh(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None (broadcast); got {value!r}.")
    return value


def create_block_mask(mask_mod: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,  # noqa: N803
                      device=None, BLOCK_SIZE: int | tuple[int, int] = 128, _compile: bool = False,  # noqa: N803
                      **_ignored) -> BlockMask:
    """The :class:`~attnkit.masks.BlockMask` of ``mask_mod`` over ``Q_LEN x KV_LEN`` (torch's signature).

    Tiles are classified from the mod's index intervals where it uses integer arithmetic, comparisons and
    indexing, else evaluated tile by tile; memory is O(tiles + tiles evaluated at once), never ``Q_LEN x
    KV_LEN``. ``_compile`` is accepted and ignored.
    """
    mm = _masks.MaskMod(mask_mod, _check_bh("B", B), _check_bh("H", H))
    return mm.plan(_check_len("Q_LEN", Q_LEN), _check_len("KV_LEN", KV_LEN), BLOCK_SIZE, batch_ndim=2,
                   device=device)


def _is_score_mod(fn: Callable) -> bool:
    try:
        return len(inspect.signature(fn).parameters) == 5
    except (TypeError, ValueError):
        return False


def create_mask(mod_fn: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,  # noqa: N803
                device=None) -> Tensor:
    """The dense ``(B|1, H|1, Q_LEN, KV_LEN)`` tensor of a ``mask_mod`` (bool) or a ``score_mod`` (its output
    on zero scores), as torch's ``create_mask`` (it materializes: for small problems and tests)."""
    Bn, Hn = _check_bh("B", B) or 1, _check_bh("H", H) or 1
    L, S = _check_len("Q_LEN", Q_LEN), _check_len("KV_LEN", KV_LEN)
    b = torch.arange(Bn, device=device).view(Bn, 1, 1, 1)
    h = torch.arange(Hn, device=device).view(1, Hn, 1, 1)
    q = torch.arange(L, device=device).view(1, 1, L, 1)
    kv = torch.arange(S, device=device).view(1, 1, 1, S)
    if _is_score_mod(mod_fn):
        return torch.broadcast_to(mod_fn(torch.zeros(Bn, Hn, L, S, device=device), b, h, q, kv), (Bn, Hn, L, S))
    return torch.broadcast_to(mod_fn(b, h, q, kv), (Bn, Hn, L, S))


def flex_attention(query: Tensor, key: Tensor, value: Tensor, score_mod: Callable | None = None,
                   block_mask=None, scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                   kernel_options: dict | None = None, *, return_aux=None):
    """``softmax(score_mod(scale Q K^T) | block_mask) V`` tile by tile (torch's signature; see the module).

    Returns:
        ``out``; ``(out, lse)`` with ``return_lse=True``; ``(out, AuxOutput)`` with ``return_aux``.

    Raises:
        ValueError/TypeError for shapes, head counts without ``enable_gqa``, a block mask of other lengths,
        or ``return_lse`` together with ``return_aux``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}.")
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape (B, H, L, E); got {tuple(t.shape)}.")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key/value {key.shape[1]}: pass enable_gqa=True for "
            "grouped-query attention."
        )
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None; got {type(kernel_options).__name__}.")
    if return_lse and return_aux is not None:
        raise ValueError("pass either return_lse=True or return_aux=AuxRequest(lse=True), not both.")
    want_lse = bool(return_lse) or bool(getattr(return_aux, "lse", False))
    want_max = bool(getattr(return_aux, "max_scores", False))
    if want_max:
        raise ValueError("return_aux=AuxRequest(max_scores=True) is not supported by attnkit; ask for lse.")
    L, S = query.shape[-2], key.shape[-2]
    mask = None
    if block_mask is not None:
        mask = block_mask if isinstance(block_mask, _masks.Mask) else _masks.from_torch_block_mask(block_mask)
        if isinstance(mask, _masks.BlockMask) and (mask.L, mask.S) != (L, S):
            raise ValueError(
                f"block_mask was made for Q_LEN={mask.L}, KV_LEN={mask.S}; the inputs have L={L}, S={S}. "
                "Call create_block_mask with these lengths."
            )
    res = attention(query, key, value, score_mod=score_mod, mask=mask, scale=scale, return_lse=want_lse)
    if not want_lse:
        return res
    out, lse = res
    if return_aux is not None:
        return out, AuxOutput(lse=lse)
    return out, lse
