"""``attention``: the one functional contract every attnkit kernel implements.

    out = normalize(score(Q, K) * scale + bias, mask) @ V

==============  ===================  ===================================================================
symbol          argument             shape
==============  ===================  ===================================================================
``Q``           ``query``            ``(..., L, Dk)``   (heads layout: ``(B, H, L, D)``)
``K``           ``key``              ``(..., S, Dk)``   (``(B, Hkv, S, D)``; ``Hkv`` may divide ``H``: GQA/MQA)
``V``           ``value``            ``(..., S, Dv)``
``score``       ``score``            callable ``(q, k) -> (..., L, S)``; see :mod:`attnkit.functional.scores`
``score_mod``   ``score_mod``        ``(score, b, h, q_idx, kv_idx) -> score``: FlexAttention's, per tile
``mask``        ``mask``             :class:`attnkit.masks.Mask` or bool tensor broadcastable to the scores
``bias``        ``bias``             float tensor broadcastable to the scores (ALiBi, relative positions)
==============  ===================  ===================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from attnkit import masks as _masks
from attnkit import scores as _scores
from attnkit._checks import check_broadcast, check_probability, check_tensor
from attnkit.functional import _nonfinite
from attnkit.softmax import NORMALIZERS

__all__ = ["attention"]

_SCORE_NAMES: dict[str, Callable] = {
    "dot": _scores.dot,
    "scaled_dot": _scores.scaled_dot,
    "gaussian": _scores.gaussian,
}


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    score: Callable[[Tensor, Tensor], Tensor] | str = _scores.scaled_dot,
    score_mod: Callable | None = None,
    mask: _masks.Mask | Tensor | None = None,
    bias: Tensor | None = None,
    normalize: str | Callable[[Tensor, Tensor | None], Tensor] = "softmax",
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool | str = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """Attention: score every key for every query, normalize, and average the values with those weights.

    ``out = normalize(score(query, key) * scale + bias, mask) @ value``. The dense scaled-dot softmax case runs
    through ``F.scaled_dot_product_attention``; structured masks go to kernels that skip what is masked.

    Args:
        query, key, value: floating tensors of one dtype and device.
        score: scoring function ``(q, k) -> scores`` or one of ``"dot"``, ``"scaled_dot"``, ``"gaussian"``.
            A callable of your own may be called on chunks of keys only if it sets ``score.index_free = True``;
            anything that depends on positions belongs in ``score_mod``.
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, applied to the scaled
            scores of each tile with that tile's (broadcastable) index tensors; captured floating tensors get
            gradients, integer ones are read. Existing FlexAttention mods run unchanged.
        mask: which keys each query may attend to (True = may attend). A query with no allowed key gets zero
            weights and zero output.
        bias: additive float term on the scores (never use it for masking: use ``mask``).
        normalize: ``"softmax"`` (default), ``"none"``, ``"relu"``, ``"sigmoid"`` or ``(scores, mask) -> weights``.
        scale: multiplier on the scores; for ``scaled_dot`` it replaces ``1 / sqrt(Dk)``.
        dropout_p: dropout on the weights (applied whenever > 0: pass 0.0 at evaluation time).
        return_weights: also return the attention weights; ``"sparse"`` returns them as a coalesced
            ``torch.sparse_coo_tensor`` holding only the pairs the kernel computed (no ``L x S`` tensor on the
            sparse kernels).
        return_lse: also return the natural-log log-sum-exp of each query's scores ``(..., L)`` (``-inf`` for a
            row with no allowed key), so results over key blocks merge exactly; it carries no gradient.
        backend: ``"auto"`` picks from the mask's structure; ``"math"`` is the plain reference path,
            ``"sdpa"`` PyTorch's fused kernel; see :mod:`attnkit.kernels.dispatch` for the others.

    Returns:
        ``out``; with ``return_weights`` and/or ``return_lse``, the tuple ``(out, weights, lse)`` of what was
        asked, in that order. ``weights`` are the ones that multiplied ``value`` (after dropout).

    Shape:
        query ``(..., L, Dk)``, key ``(..., S, Dk)``, value ``(..., S, Dv)`` -> out ``(..., L, Dv)``,
        weights ``(..., L, S)``.

    Raises:
        TypeError: non-tensor or non-floating inputs, a non-boolean mask, mixed dtypes.
        ValueError: ranks, lengths or head counts that do not fit; a mask or bias that does not broadcast;
            an explicit ``backend`` that cannot serve the request.
    """
    from attnkit.kernels import dispatch  # kernels sit below functional; imported here to keep the graph simple

    query, key, value, scores_shape = _check_qkv(query, key, value)
    score = _resolve_score(score)
    if score in (_scores.dot, _scores.scaled_dot, _scores.gaussian):
        _scores._same_dim(query, key, score.__name__)
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score; got "
                        f"{type(score_mod).__name__}.")
    mask = _check_mask(mask, scores_shape)
    if bias is not None:
        check_tensor("bias", bias, floating=True, hint="bias is an additive float term; masks go in mask=.")
        check_broadcast("bias", bias.shape, scores_shape)
    if not (callable(normalize) or normalize in NORMALIZERS):
        raise ValueError(
            f"normalize must be one of {sorted(NORMALIZERS)} or a callable (scores, mask) -> weights; "
            f"got {normalize!r}."
        )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None; got {type(scale).__name__}.")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite; got {scale!r}.")
    if return_weights not in (False, True, "sparse"):
        raise ValueError(f"return_weights must be False, True or 'sparse'; got {return_weights!r}.")
    dropout_p = check_probability("dropout_p", dropout_p)

    request = dict(score=score, score_mod=score_mod, mask=mask, bias=bias, normalize=normalize, scale=scale,
                   dropout_p=dropout_p, return_weights=return_weights, return_lse=bool(return_lse))
    name = dispatch.choose(query, key, value, **request) if backend == "auto" else dispatch.validate(
        backend, query, key, value, **request)
    seen, result = None, None
    if mask is not None and not dispatch._tracing():
        key, value = _sanitize_unused_keys(mask, query, key, value)
        result = dispatch.run_checked(name, query, key, value, **request)  # a kernel that checks as it reads
        if result is None:
            query, key, value, seen = _nonfinite.guard(query, key, value, mask)
    if result is None:
        result = dispatch.run(name, query, key, value, **request)
    out, weights, lse = _nonfinite.poison(seen, *result)
    if return_weights == "sparse" and not weights.is_sparse:  # a backend that materialized them anyway
        weights = weights.to_sparse()
    if not (return_weights or return_lse):
        return out
    return (out,) + ((weights,) if return_weights else ()) + ((lse,) if return_lse else ())


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, floating=True, min_ndim=2, hint="Expected (..., length, features).")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}."
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device; got {query.device}, {key.device}, {value.device}."
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            "key and value must agree in every dimension but the last, (..., S, D): got key "
            f"{tuple(key.shape)} and value {tuple(value.shape)}."
        )
    if query.ndim != key.ndim:
        raise ValueError(
            f"query and key must have the same rank; got query {tuple(query.shape)} and key {tuple(key.shape)}."
        )
    if query.ndim >= 4 and query.shape[-3] != key.shape[-3] and key.shape[-3] != 1:
        hq, hkv = query.shape[-3], key.shape[-3]
        if hq % hkv:
            raise ValueError(
                f"query heads must be a multiple of key/value heads (grouped-query attention); got {hq} query "
                f"heads and {hkv} key/value heads (dim -3)."
            )
        # GQA: query head h reads key/value head h // (hq // hkv)
        key = key.repeat_interleave(hq // hkv, dim=-3)  # (..., H, S, Dk)
        value = value.repeat_interleave(hq // hkv, dim=-3)  # (..., H, S, Dv)
    batch = _broadcast(tuple(query.shape[:-2]), tuple(key.shape[:-2]))
    if batch is None:
        raise ValueError(
            f"query and key batch dimensions must broadcast; got query {tuple(query.shape)} and "
            f"key {tuple(key.shape)}."
        )
    return query, key, value, (*batch, query.shape[-2], key.shape[-2])


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of two shapes, or None if they do not broadcast (plain Python: torch.broadcast_shapes costs
    tens of microseconds a call, as much as a small attention)."""
    if a == b:
        return a
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _resolve_score(score: Callable | str) -> Callable:
    if isinstance(score, str):
        if score not in _SCORE_NAMES:
            raise ValueError(
                f"score must be a callable (q, k) -> scores or one of {sorted(_SCORE_NAMES)}; got {score!r}. "
                "Parametrized scores (general, additive, concat) are passed with functools.partial."
            )
        return _SCORE_NAMES[score]
    if not callable(score):
        raise TypeError(f"score must be a callable (q, k) -> scores or a name; got {type(score).__name__}.")
    return score


def _check_mask(mask: _masks.Mask | Tensor | None, scores_shape: tuple[int, ...]) -> _masks.Mask | None:
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a boolean tensor (True = may attend); got {mask.dtype}. Pass additive float "
                "terms as bias=, or convert a 0/1 mask with mask.bool()."
            )
        check_broadcast("mask", mask.shape, scores_shape,
                        hint="For key padding use attnkit.masks.padding(lengths).")
        return _masks.Dense(mask)
    mask = _as_attnkit_mask(mask)
    mask.check(scores_shape)
    return mask


def _as_attnkit_mask(mask) -> _masks.Mask:
    """attnkit masks pass; a BlockMask of ``torch.nn.attention.flex_attention`` is converted (its mask_mod)."""
    if isinstance(mask, _masks.Mask):
        return mask
    if type(mask).__name__ == "BlockMask" and hasattr(mask, "mask_mod"):
        return _masks.from_torch_block_mask(mask)
    raise TypeError(f"mask must be an attnkit Mask or a boolean tensor; got {type(mask).__name__}.")


def _sanitize_unused_keys(mask: _masks.Mask, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Zero key/value rows that no query may attend, so NaN/inf sitting in padding cannot leak (0 * NaN = NaN)."""
    unused = mask.unused_keys(query.shape[-2], key.shape[-2], query.ndim - 2, query.device)
    if unused is None or not bool(unused.any()):
        return key, value
    return key.masked_fill(unused, 0.0), value.masked_fill(unused, 0.0)
