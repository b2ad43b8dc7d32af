"""Chunked online-softmax attention for any score function and bias: memory bounded by one tile of pairs.

Scores such as additive attention, ``w_v^T tanh(W_q q + W_k k)``, hold an ``(..., L, S, hidden)`` tensor when
broadcast over all pairs. Here the queries are cut into row blocks of R and the keys into chunks of C; for each
row block the chunks are visited in turn:

    s = score(q_r, k_c) * scale + bias_rc   (masked entries -inf)      (..., R, C)
    m_c = max_j s,  l_c = sum_j exp(s - m_c),  a_c = exp(s - m_c) v_c

and merged with the online-softmax rule (Milakov & Gimelshein 2018):

    M = max(M, m_c);  l = l e^{M_old - M} + l_c e^{m_c - M};  a = a e^{M_old - M} + a_c e^{m_c - M};  out = a / l

Any score callable gets one row block (R = L) and key chunks of about 2^18 score elements. Additive scores
(``functools.partial(scores.additive, w_q=, w_k=, w_v=)``, or the 2-D ``scores.concat``) take a faster path:
the projections ``W_q q`` and ``W_k k`` are computed once, outside the loops, and each tile only forms
``w_v^T tanh(q_h + k_h)`` in a ``(..., R, C, hidden)`` buffer small enough to stay in cache (tanh in place).

Each tile runs under ``torch.utils.checkpoint`` (non-reentrant) when gradients are on, so autograd keeps only
the tile's inputs and its (R, Dv) partial results and recomputes the tile's scores in backward: no
``L x S x hidden`` (nor ``L x S``) tensor is saved, and parameters captured inside the score callable get their
gradients as usual. The maxima ``m_c`` are constants to autograd (softmax does not depend on them). Rows with
no allowed key -> 0.

Paper (online softmax): https://arxiv.org/abs/1805.02867

Shape letters: ``*b`` batch dims, L queries, S keys, R queries per block, C keys per chunk, Dv value dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnkit import masks as _masks
from attnkit import scores as _scores
from attnkit.masks import allowed_on

__all__ = ["chunked_attention"]

_BUDGET = 1 << 18  # score elements per tile (batch x R x C) for a general score callable
_ADDITIVE_BUDGET = 1 << 20  # elements of the (batch, R, C, hidden) tanh buffer of the additive path (4 MiB fp32)


def _scores_for(score: Callable, q: Tensor, k: Tensor, scale: float | None) -> Tensor:
    if q.dtype in (torch.float16, torch.bfloat16) and score in (_scores.dot, _scores.scaled_dot, _scores.gaussian):
        q, k = q.float(), k.float()  # q . k of half inputs can exceed 65504 where the scaled score does not
    if score is _scores.scaled_dot:
        return _scores.scaled_dot(q, k, scale=scale)  # (*b, R, C)
    s = score(q, k)  # (*b, R, C)
    return s if scale is None else s * scale


class _AdditiveTile:
    """``w_v^T tanh(q_h + k_h)`` for projected queries ``q_h = W_q q`` and keys ``k_h = W_k k``, tile by tile.

    Without autograd every tile writes into one reused ``(*b, R, C, hidden)`` buffer (a fresh multi-MiB
    tensor per tile costs page faults that, on a CPU, take longer than the tanh); with autograd each tile gets
    its own tensor, as checkpointing needs.

    Shape:
        q_h (*b, R, hidden), k_h (*b, C, hidden), w_v (hidden,) -> (*b, R, C).
    """

    def __init__(self, w_v: Tensor):
        self.w_v = w_v
        self.buffer: Tensor | None = None

    def __call__(self, q_h: Tensor, k_h: Tensor) -> Tensor:
        q4, k4 = q_h.unsqueeze(-2), k_h.unsqueeze(-3)  # (*b, R, 1, hidden), (*b, 1, C, hidden)
        if torch.is_grad_enabled() and (q_h.requires_grad or k_h.requires_grad or self.w_v.requires_grad):
            # tanh(W_q q + W_k k), in place on the tile's own tensor
            features = torch.tanh_(q4 + k4)  # (*b, R, C, hidden)
        else:
            shape = torch.broadcast_shapes(q4.shape, k4.shape)
            n = math.prod(shape)
            dtype = torch.result_type(q_h, k_h)
            if self.buffer is None or self.buffer.numel() < n or self.buffer.dtype != dtype:
                self.buffer = torch.empty(n, dtype=dtype, device=q_h.device)
            features = self.buffer[:n].view(shape)  # (*b, R, C, hidden)
            # tanh(W_q q + W_k k), in place in the reused buffer
            torch.tanh_(torch.add(q4, k4, out=features))
        # w_v^T tanh(...)
        return features @ self.w_v  # (*b, R, C)


def _additive_weights(score: Callable, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(W_q, W_k, w_v)`` when ``score`` is additive with all weights bound by keyword, else None.

    Recognizes ``functools.partial(scores.additive, w_q=, w_k=, w_v=)`` and
    ``functools.partial(scores.concat, weight=(hidden, Dq + Dk), v=(hidden,))``. Weights of the wrong shape
    return None, so the general path calls the score and raises its own error.
    """
    if not isinstance(score, functools.partial) or score.args:
        return None
    kw = score.keywords
    if score.func is _scores.additive and set(kw) == {"w_q", "w_k", "w_v"}:
        w_q, w_k, w_v = kw["w_q"], kw["w_k"], kw["w_v"]
    elif score.func is _scores.concat and set(kw) == {"weight", "v"}:
        weight, w_v = kw["weight"], kw["v"]
        if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[-1] != query.shape[-1] + key.shape[-1]:
            return None
        w_q, w_k = weight[:, : query.shape[-1]], weight[:, query.shape[-1]:]
    else:
        return None
    if not all(isinstance(w, Tensor) for w in (w_q, w_k, w_v)) or w_v.ndim != 1:
        return None
    hidden = w_v.shape[0]
    if w_q.shape != (hidden, query.shape[-1]) or w_k.shape != (hidden, key.shape[-1]):
        return None
    return w_q, w_k, w_v


def _chunk_stats(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, allowed: Tensor | None,
                 score: Callable, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    s = _scores_for(score, q, k, scale)  # (*b, R, C)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s = s.to(acc)
    if bias is not None:
        s = s + bias.to(acc)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # m_c = max_j s_j (a constant to autograd), 0 for rows with nothing allowed
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # (*b, R, 1)
    p = torch.exp(s - m)  # (*b, R, C)
    return m, p.sum(-1, keepdim=True), p @ v.to(acc)  # (*b, R, 1), (*b, R, 1), (*b, R, Dv)


def _bias_tile(bias: Tensor | None, r0: int, r1: int, c0: int, c1: int) -> Tensor | None:
    if bias is None:
        return None
    if bias.shape[-1] != 1:
        bias = bias[..., c0:c1]
    if bias.ndim >= 2 and bias.shape[-2] != 1:
        bias = bias[..., r0:r1, :]
    return bias


def _tiling(L: int, S: int, nb: int, hidden: int | None, chunk_size: int | None) -> tuple[int, int]:
    """``(R, C)``: query rows per block and keys per chunk."""
    if hidden is None:  # general score: all rows at once, key chunks of ~_BUDGET score elements
        return max(L, 1), chunk_size or max(16, _BUDGET // max(1, nb * L))
    pairs = max(1, _ADDITIVE_BUDGET // hidden)  # pairs (batch x R x C) per tile
    C = chunk_size or max(1, min(S, pairs // max(1, nb)))
    return max(1, min(L, pairs // max(1, nb * C))), C


def chunked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    score: Callable[[Tensor, Tensor], Tensor] = _scores.scaled_dot,
    mask: _masks.Mask | Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Softmax attention with any score function, computed over tiles of pairs with an online softmax.

    ``out = softmax(score(q, k) * scale + bias, mask) @ v`` (``scale`` replaces 1/sqrt(D) for ``scaled_dot``).

    Args:
        query, key, value: floating tensors of one dtype.
        score: ``(q, k) -> (..., L, S)`` for any pairwise score (called on query blocks and key slices).
            Additive scores bound with ``functools.partial`` (see the module docstring) take a faster path.
        mask: attnkit mask or boolean tensor broadcastable to the scores (True = may attend).
        bias: float tensor broadcastable to the scores (ALiBi, relative positions).
        scale: multiplier on the scores (see above).
        chunk_size: keys per chunk; default keeps a tile near 2^18 score elements (additive: 2^20 elements of
            the tanh buffer).
        return_weights: also return the weights (..., L, S), rebuilt tile by tile from the log-sum-exp.
        return_lse: also return the log-sum-exp (..., L) (natural log, -inf for rows with no key).

    Returns:
        ``out`` (..., L, Dv) in the input dtype, or ``(out, weights)``.

    Shape:
        query (..., L, Dq), key (..., S, Dk), value (..., S, Dv) -> out (..., L, Dv).

    Raises:
        TypeError/ValueError on bad tensors or a bad ``chunk_size``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim < 2:
            raise TypeError(f"{name} must be a floating tensor of shape (..., length, dim); got {t!r:.80}.")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must share the length S; got {key.shape[-2]} and {value.shape[-2]}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    L, S = query.shape[-2], key.shape[-2]
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
    nb = math.prod(batch)
    if mask is not None:
        mask = _masks.as_mask(mask)
    batch_ndim = len(batch)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q_in, k_in, tile_score = query, key, score
    additive = _additive_weights(score, query, key)
    if additive is not None:
        w_q, w_k, w_v = additive
        # W_q q and W_k k, once for every tile
        q_in = query @ w_q.transpose(0, 1)  # (*b, L, hidden)
        k_in = key @ w_k.transpose(0, 1)  # (*b, S, hidden)
        tile_score = _AdditiveTile(w_v)
    R, C = _tiling(L, S, nb, None if additive is None else w_v.shape[0], chunk_size)
    row_blocks = [(r0, min(L, r0 + R)) for r0 in range(0, L, R)] or [(0, 0)]
    col_chunks = [(c0, min(S, c0 + C)) for c0 in range(0, S, C)]
    if not col_chunks:  # S == 0: nothing to attend; zero output, still part of the graph (zero gradients)
        out = query.new_zeros(*batch, L, value.shape[-1])
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            out = out + 0.0 * (query.sum() + key.sum() + value.sum())
        lse0 = query.new_full((*batch, L), float("-inf"))
        return (out,) + ((query.new_zeros(*batch, L, 0),) if return_weights else ()) + \
            ((lse0,) if return_lse else ()) if (return_weights or return_lse) else out
    grad = torch.is_grad_enabled()
    outs, lses = [], []
    for r0, r1 in row_blocks:
        qi = torch.arange(r0, r1, device=query.device).unsqueeze(0)  # (1, R)
        q_r = q_in[..., r0:r1, :]  # (*b, R, Dq or hidden)
        M = l_tot = a_tot = None
        for c0, c1 in col_chunks:
            allowed = None
            if mask is not None:
                kj = torch.arange(c0, c1, device=query.device).unsqueeze(0)  # (1, C)
                allowed = allowed_on(mask, qi, kj, L, S, batch_ndim).squeeze(-3)  # (*mb, R, C)
            args = (q_r, k_in[..., c0:c1, :], value[..., c0:c1, :], _bias_tile(bias, r0, r1, c0, c1), allowed,
                    tile_score, scale)
            if grad:  # keep only the tile's inputs; recompute its scores in backward
                m, l, a = checkpoint(_chunk_stats, *args, use_reentrant=False)
            else:
                m, l, a = _chunk_stats(*args)
            if M is None:
                M, l_tot, a_tot = m, l, a
                continue
            # online merge: rescale both sides to the new running maximum
            M_new = torch.maximum(M, m)
            r_old, r_new = torch.exp(M - M_new), torch.exp(m - M_new)
            l_tot = l_tot * r_old + l * r_new
            a_tot = a_tot * r_old + a * r_new
            M = M_new
        outs.append(a_tot / torch.where(l_tot > 0, l_tot, torch.ones_like(l_tot)))  # (*b, R, Dv)
        if return_weights or return_lse:
            # lse = M + log l (differentiable through l); +inf on empty rows so their weights are exactly 0
            lses.append(torch.where(l_tot > 0, M + torch.log(torch.where(l_tot > 0, l_tot, torch.ones_like(l_tot))),
                                    torch.full_like(l_tot, float("inf"))))  # (*b, R, 1)
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)).to(query.dtype)  # (*b, L, Dv)
    lse_out = None
    if return_lse:  # +inf marked empty rows for the weights; the contract says -inf
        lse_all = torch.cat(lses, dim=-2).squeeze(-1).detach()  # (*b, L)
        lse_out = torch.where(torch.isinf(lse_all) & (lse_all > 0), float("-inf"), lse_all).expand(*batch, L)
    if not return_weights:
        return (out, lse_out) if return_lse else out
    rows = []
    for (r0, r1), lse in zip(row_blocks, lses, strict=True):
        qi = torch.arange(r0, r1, device=query.device).unsqueeze(0)  # (1, R)
        parts = []
        for c0, c1 in col_chunks:
            s = _scores_for(tile_score, q_in[..., r0:r1, :], k_in[..., c0:c1, :], scale).to(acc)
            b_c = _bias_tile(bias, r0, r1, c0, c1)
            if b_c is not None:
                s = s + b_c.to(acc)
            if mask is not None:
                kj = torch.arange(c0, c1, device=query.device).unsqueeze(0)  # (1, C)
                s = s.masked_fill(~allowed_on(mask, qi, kj, L, S, batch_ndim).squeeze(-3), float("-inf"))
            p = torch.exp(s - lse)  # (*b, R, C)
            parts.append(p.expand(*batch, r1 - r0, c1 - c0))
        rows.append(torch.cat(parts, dim=-1))  # (*b, R, S)
    weights = rows[0] if len(rows) == 1 else torch.cat(rows, dim=-2)  # (*b, L, S)
    return (out, weights.to(query.dtype)) + ((lse_out,) if return_lse else ())


# ---- the kernel contract (attnkit.kernels._contract) ---------------------------------------------------------

def index_free(score) -> bool:
    """Whether ``score(q, k)`` may be called on key chunks: attnkit's own scores (and ``functools.partial`` of
    them), or a callable that declares ``score.index_free = True``. A score that depends on positions (a
    relative bias closure) would see chunk-local positions, so it is never split unless it says so."""
    base = score.func if isinstance(score, functools.partial) else score
    if base in (_scores.dot, _scores.scaled_dot, _scores.gaussian, _scores.general, _scores.additive,
                _scores.concat):
        return True
    return bool(getattr(score, "index_free", False))


def supports(query, key, value, *, score, score_mod=None, normalize, dropout_p, **_) -> str | None:
    if normalize != "softmax":
        return "its online softmax serves normalize='softmax' only; use backend='math'"
    if dropout_p > 0:
        return "it has no dropout on the weights; use backend='math'"
    if score_mod is not None:
        return "it takes no score_mod; use backend='tiled'"
    if not index_free(score):
        return ("it calls score(q, k) on key chunks, and this score callable does not declare itself "
                "position-independent (set score.index_free = True if it is; for positions use score_mod=, "
                "which gets the tile's indices)")
    return None


def suits(query, key, value, **_) -> bool:
    return query.shape[-2] * key.shape[-2] >= 512 * 512


def run(query, key, value, *, score, mask, bias, scale, return_weights, return_lse=False, **_):
    res = chunked_attention(query, key, value, score=score, mask=mask, bias=bias, scale=scale,
                            return_weights=bool(return_weights), return_lse=return_lse)
    res = res if isinstance(res, tuple) else (res,)
    out, rest = res[0], list(res[1:])
    weights = rest.pop(0) if return_weights else None
    return out, weights, (rest.pop(0) if return_lse else None)
