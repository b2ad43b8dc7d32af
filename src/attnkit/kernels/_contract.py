"""The kernel contract: what every kernel file exports, and the request helpers they share.

A kernel file defines three functions over one *request* (keyword arguments ``score``, ``score_mod``,
``mask``, ``bias``, ``normalize``, ``scale``, ``dropout_p``, ``return_weights``, ``return_lse``; ``mask`` is an
:class:`attnkit.masks.Mask` or None):

* ``supports(query, key, value, **request) -> str | None``: None if it can serve the request, else the reason;
* ``suits(query, key, value, **request) -> bool``: whether ``backend="auto"`` should pick it (speed);
* ``run(query, key, value, **request) -> (out, weights | None, lse | None)``;
* optionally ``run_checked(query, key, value, **request) -> (out, weights, lse) | None``: ``run`` on inputs the
  non-finite guard (:mod:`attnkit.functional._nonfinite`) has not seen, None where a row it read is not finite
  (the caller then guards them and calls ``run``): for a kernel that can check the rows it reads more cheaply
  than the guard's pass over all of them.

:mod:`attnkit.kernels.dispatch` holds the ordered table. ``lse`` is the natural-log log-sum-exp of the scores
each query normalized over (``-inf`` for a row with no allowed key), ``(..., L)``; it carries no gradient.
"""

from __future__ import annotations

import math

import torch

from attnkit import scores as _scores


def dot_scale(query, score, scale) -> float:
    """Scale of a dot-product score: ``scale`` replaces 1/sqrt(D) for scaled_dot, multiplies ``dot``."""
    if scale is not None:
        return float(scale)
    D = query.shape[-1]
    return 1.0 / math.sqrt(D) if score is _scores.scaled_dot and D else 1.0


def apply_score_mod(score_mod, s, idx):
    """``score_mod(s, *idx)``, checked: a tensor broadcastable to the scores' shape, in their dtype."""
    out = score_mod(s, *idx)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"score_mod must return a floating tensor (the modified scores); got {got}.")
    if out.shape != s.shape:
        try:
            ok = torch.broadcast_shapes(out.shape, s.shape) == s.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"score_mod must return scores of the shape it was given, {tuple(s.shape)} (an "
                             f"elementwise change of each score); got {tuple(out.shape)}.")
        out = out.expand(s.shape)
    return out if out.dtype == s.dtype else out.to(s.dtype)


def is_dot(score) -> bool:
    return score in (_scores.scaled_dot, _scores.dot)


def softmax_dot_reason(*, score, score_mod=None, bias=None, normalize="softmax", dropout_p=0.0, **_) -> str | None:
    """Why a plain dot-product softmax kernel (no score_mod, bias or dropout) cannot serve, or None."""
    if not is_dot(score):
        return "it computes dot-product scores only (score=scaled_dot or dot); use backend='chunked' or 'math'"
    if normalize != "softmax":
        return "it normalizes with softmax only; use backend='math'"
    if score_mod is not None:
        return "it takes no score_mod; use backend='tiled' (score_mod per tile) or 'math'"
    if bias is not None:
        return "it takes no bias; use backend='chunked' (online softmax with bias) or 'math'"
    if dropout_p > 0:
        return "it has no dropout on the weights; use backend='math'"
    return None


def split_steps(G: int, N: int, per: int, budget: int):
    """``(n0, n1), (a, b)``: batch rows and group rows of each step over ``G`` query blocks and ``N`` batch rows,
    at most ``budget`` elements a step when one block of one batch row needs ``per`` (its scores, or its gathered
    keys and values), so a step stays in cache: small steps take several blocks of every batch row, large ones one
    block of a few batch rows."""
    if N == 0:
        return
    per = max(1, per)
    if N * per <= budget:
        step = max(1, budget // (N * per))
        for a in range(0, G, step):
            yield (0, N), (a, min(G, a + step))
    else:
        nstep = max(1, budget // per)
        for a in range(G):
            for n0 in range(0, N, nstep):
                yield (n0, min(N, n0 + nstep)), (a, a + 1)


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """The checks every kernel's own entry makes on its inputs: tensors, floating point, (..., length, dim), one
    dtype, matching D and S."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}.")
        if t.ndim < 2:
            raise ValueError(f"{name} must have shape (..., length, dim); got {tuple(t.shape)}.")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key, value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must share the last dim D; got {query.shape[-1]} and {key.shape[-1]}.")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must share the length S; got {key.shape[-2]} and {value.shape[-2]}.")
