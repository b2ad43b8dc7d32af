"""Scoring functions a(q, k): how much a query "matches" each key, before normalization.

Each is a plain function ``score(query, key, ...) -> scores`` that you pass to
:func:`attnkit.functional.attention` (bind parameters with :func:`functools.partial`)::

    from functools import partial
    attention(q, k, v, score=partial(additive, w_q=W_q, w_k=W_k, w_v=w_v))

=============  =========================================  ================================================
name           equation                                   notes
=============  =========================================  ================================================
``dot``        ``q . k``                                  Luong "dot"; needs ``Dq == Dk``
``scaled_dot`` ``q . k / sqrt(d)``                        Vaswani; the default
``general``    ``q^T W k``                                Luong "general" (bilinear); ``W`` ``(Dq, Dk)``
``additive``   ``w_v^T tanh(W_q q + W_k k)``              Bahdanau; ``q`` and ``k`` may differ in size
``concat``     ``w^T [q; k]`` or ``v^T tanh(W [q; k])``   seed 004's "concatenate, then a linear layer" rules
``gaussian``   ``-(w ||q - k||)^2 / 2``                   Nadaraya-Watson kernel; ``w`` = 1 / width
=============  =========================================  ================================================

Shape:
    query ``(..., L, Dq)``, key ``(..., S, Dk)`` -> scores ``(..., L, S)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dot", "scaled_dot", "general", "additive", "concat", "gaussian", "ALiBi", "alibi"]


def _same_dim(query: Tensor, key: Tensor, name: str) -> None:
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"{name} scores need query and key of the same last dimension; got query {query.shape[-1]} and "
            f"key {key.shape[-1]}. For different sizes use score=general or score=additive."
        )


def dot(query: Tensor, key: Tensor) -> Tensor:
    """Dot-product scores ``q . k`` (Luong "dot").

    Shape:
        query ``(..., L, D)``, key ``(..., S, D)`` -> ``(..., L, S)``.
    """
    _same_dim(query, key, "dot")
    # a(q, k) = q . k
    return query @ key.transpose(-2, -1)  # (..., L, S)


def scaled_dot(query: Tensor, key: Tensor, scale: float | None = None) -> Tensor:
    """Scaled dot-product scores ``q . k / sqrt(d)`` (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762).

    Args:
        scale: multiplier used instead of ``1 / sqrt(d)`` when given.

    Shape:
        query ``(..., L, D)``, key ``(..., S, D)`` -> ``(..., L, S)``.
    """
    _same_dim(query, key, "scaled_dot")
    if scale is None:  # D = 0: every score is 0 whatever the scale
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    # a(q, k) = q . k / sqrt(d)
    return (query @ key.transpose(-2, -1)) * scale  # (..., L, S)


def general(query: Tensor, key: Tensor, weight: Tensor) -> Tensor:
    """Bilinear ("general", Luong et al. 2015) scores ``q^T W k``.

    Args:
        weight: ``W`` of shape ``(Dq, Dk)``.

    Shape:
        query ``(..., L, Dq)``, key ``(..., S, Dk)`` -> ``(..., L, S)``.
    """
    if weight.ndim != 2 or weight.shape != (query.shape[-1], key.shape[-1]):
        raise ValueError(
            f"general score weight must have shape (Dq, Dk) = ({query.shape[-1]}, {key.shape[-1]}); "
            f"got {tuple(weight.shape)}."
        )
    # a(q, k) = q^T W k
    return (query @ weight) @ key.transpose(-2, -1)  # (..., L, S)


def additive(query: Tensor, key: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Tensor:
    """Additive (Bahdanau et al. 2015, https://arxiv.org/abs/1409.0473) scores ``w_v^T tanh(W_q q + W_k k)``.

    ==========  =============  ====================
    symbol      argument       shape
    ==========  =============  ====================
    ``W_q``     ``w_q``        ``(hidden, Dq)``
    ``W_k``     ``w_k``        ``(hidden, Dk)``
    ``w_v``     ``w_v``        ``(hidden,)``
    ==========  =============  ====================

    This broadcast form holds an ``(..., L, S, hidden)`` tensor; the chunked kernel bounds that by a chunk.

    Shape:
        query ``(..., L, Dq)``, key ``(..., S, Dk)`` -> ``(..., L, S)``.
    """
    hidden = w_v.shape[0] if w_v.ndim == 1 else None
    if hidden is None or w_q.shape != (hidden, query.shape[-1]) or w_k.shape != (hidden, key.shape[-1]):
        raise ValueError(
            "additive score weights must be w_q (hidden, Dq), w_k (hidden, Dk), w_v (hidden,) with "
            f"Dq={query.shape[-1]}, Dk={key.shape[-1]}; got w_q {tuple(w_q.shape)}, w_k {tuple(w_k.shape)}, "
            f"w_v {tuple(w_v.shape)}."
        )
    # W_q q and W_k k
    q_h = query @ w_q.transpose(0, 1)  # (..., L, hidden)
    k_h = key @ w_k.transpose(0, 1)  # (..., S, hidden)
    # tanh(W_q q + W_k k), every (query, key) pair
    features = torch.tanh(q_h.unsqueeze(-2) + k_h.unsqueeze(-3))  # (..., L, S, hidden)
    # w_v^T tanh(...)
    return features @ w_v  # (..., L, S)


def concat(query: Tensor, key: Tensor, weight: Tensor, v: Tensor | None = None) -> Tensor:
    """Seed 004's "concatenate Q and K, then a linear layer" rules.

    * ``weight`` ``(Dq + Dk,)``, no ``v``: ``a(q, k) = w^T [q; k]`` (one linear layer to a scalar).
    * ``weight`` ``(hidden, Dq + Dk)`` with ``v`` ``(hidden,)``: ``a(q, k) = v^T tanh(W [q; k])``
      (concatenate, linear, tanh, sum), which is :func:`additive` with ``W = [W_q | W_k]``.

    Shape:
        query ``(..., L, Dq)``, key ``(..., S, Dk)`` -> ``(..., L, S)``.
    """
    dq, dk = query.shape[-1], key.shape[-1]
    if weight.shape[-1] != dq + dk or weight.ndim not in (1, 2):
        raise ValueError(
            f"concat score weight must have shape (Dq + Dk,) or (hidden, Dq + Dk) with Dq + Dk = {dq + dk}; "
            f"got {tuple(weight.shape)}."
        )
    if weight.ndim == 1:
        if v is not None:
            raise ValueError("concat score: v is only used with a 2-D weight (hidden, Dq + Dk); got a 1-D weight.")
        # w^T [q; k] = w_q . q + w_k . k
        return (query @ weight[:dq]).unsqueeze(-1) + (key @ weight[dq:]).unsqueeze(-2)  # (..., L, S)
    if v is None:
        raise ValueError(f"concat score with a 2-D weight needs v of shape ({weight.shape[0]},); got None.")
    # v^T tanh(W [q; k]) with W = [W_q | W_k]
    return additive(query, key, weight[:, :dq], weight[:, dq:], v)


def gaussian(query: Tensor, key: Tensor, *, w: float | Tensor = 1.0) -> Tensor:
    """Gaussian-kernel scores ``-(w ||q - k||)^2 / 2`` (Nadaraya-Watson; ``w`` is the inverse width).

    With a softmax this is Nadaraya-Watson kernel regression: ``f(x) = sum_i softmax(-((x - x_i) w)^2 / 2) y_i``.

    Shape:
        query ``(..., L, D)``, key ``(..., S, D)`` -> ``(..., L, S)``.
    """
    _same_dim(query, key, "gaussian")
    # ||q - k|| does not change when both move by c: centre on the keys' mean so that the expansion below does
    # not cancel catastrophically for points far from the origin (times, positions around 1000)
    centre = key.mean(dim=-2, keepdim=True).detach()  # (..., 1, D)
    query, key = query - centre, key - centre
    # ||q - k||^2 = ||q||^2 + ||k||^2 - 2 q . k   (O(L S) memory instead of O(L S D))
    sq = (query * query).sum(-1).unsqueeze(-1) + (key * key).sum(-1).unsqueeze(-2)  # (..., L, S)
    sq = sq - 2.0 * (query @ key.transpose(-2, -1))  # (..., L, S)
    # -(w ||q - k||)^2 / 2
    return -0.5 * (w * w) * sq  # (..., L, S)


# ---- built-in score modifiers (FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)``) ----------------------

class ALiBi:
    """ALiBi (Press et al., 2022) as a ``score_mod``: ``score + slopes[h] * (kv_idx - q_idx)``.

    A built-in modifier: it runs wherever a ``score_mod`` does (``attention(score_mod=...)``, ``flex_attention``),
    and the compiled tile kernel (``backend="native"``) adds the bias inside its loop instead of calling it per
    tile. With ``slopes`` that need a gradient, the tiled kernel serves it (the slopes get their gradient there).

    Args:
        slopes: ``(H,)`` one slope per head, e.g. ``functional.positional.alibi_slopes(H)``.
    """

    def __init__(self, slopes: Tensor):
        if not isinstance(slopes, Tensor) or not slopes.is_floating_point():
            raise TypeError(f"slopes must be a floating-point tensor; got {type(slopes).__name__}"
                            + (f" of {slopes.dtype}" if isinstance(slopes, Tensor) else ""))
        if slopes.ndim != 1 or slopes.numel() == 0:
            raise ValueError(f"slopes must have shape (H,), one slope per head; got {tuple(slopes.shape)}")
        self.slopes = slopes

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + self.slopes[h] * (kv_idx - q_idx)

    def __repr__(self) -> str:
        return f"ALiBi(heads={self.slopes.numel()})"


def alibi(slopes: Tensor) -> ALiBi:
    """The ALiBi ``score_mod`` of ``slopes`` ``(H,)`` (see :class:`ALiBi`)."""
    return ALiBi(slopes)
