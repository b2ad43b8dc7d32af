"""Chunked online-softmax attention for any score function and bias: memory bounded by one key chunk.

Scores such as additive attention, ``w_v^T tanh(W_q q + W_k k)``, hold an ``(..., L, S, hidden)`` tensor when
broadcast over all pairs. Here the keys are cut into chunks of C; for each chunk

    s = score(q, k_c) * scale + bias_c   (masked entries -inf)         (..., L, C)
    m_c = max_j s,  l_c = sum_j exp(s - m_c),  a_c = exp(s - m_c) v_c

and the chunks are merged with the online-softmax rule (Milakov & Gimelshein 2018):

    M = max(M, m_c);  l = l e^{M_old - M} + l_c e^{m_c - M};  a = a e^{M_old - M} + a_c e^{m_c - M};  out = a / l

Each chunk runs under ``torch.utils.checkpoint`` (non-reentrant), so autograd keeps only the chunk's inputs and
its (L, Dv) partial results and recomputes the chunk's scores in backward: no ``L x S x hidden`` (nor
``L x S``) tensor is saved, and parameters captured inside the score callable get their gradients as usual.
The maxima ``m_c`` are constants to autograd (softmax does not depend on them). Rows with no allowed key -> 0.

Paper (online softmax): https://arxiv.org/abs/1805.02867

Shape letters: ``*b`` batch dims, L queries, S keys, C keys per chunk, Dv value dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnkit import masks as _masks
from attnkit.functional import scores as _scores
from attnkit.kernels._tiles import mask_on_tiles

__all__ = ["chunked_attention"]

_BUDGET = 1 << 18  # score elements per chunk (batch x L x C): bounds the recomputed score intermediates


def _scores_for(score: Callable, q: Tensor, k: Tensor, scale: float | None) -> Tensor:
    if score is _scores.scaled_dot:
        return _scores.scaled_dot(q, k, scale=scale)  # (*b, L, C)
    s = score(q, k)  # (*b, L, C)
    return s if scale is None else s * scale


def _chunk_stats(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, allowed: Tensor | None,
                 score: Callable, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    s = _scores_for(score, q, k, scale)  # (*b, L, C)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s = s.to(acc)
    if bias is not None:
        s = s + bias.to(acc)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # m_c = max_j s_j (a constant to autograd), 0 for rows with nothing allowed
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # (*b, L, 1)
    p = torch.exp(s - m)  # (*b, L, C)
    return m, p.sum(-1, keepdim=True), p @ v.to(acc)  # (*b, L, 1), (*b, L, 1), (*b, L, Dv)


def _bias_chunk(bias: Tensor | None, c0: int, c1: int) -> Tensor | None:
    if bias is None or bias.shape[-1] == 1:
        return bias
    return bias[..., c0:c1]


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
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention with any score function, computed over key chunks with an online softmax.

    ``out = softmax(score(q, k) * scale + bias, mask) @ v`` (``scale`` replaces 1/sqrt(D) for ``scaled_dot``).

    Args:
        query, key, value: floating tensors of one dtype.
        score: ``(q, k) -> (..., L, S)`` for any pairwise score (called on key slices).
        mask: attnkit mask or boolean tensor broadcastable to the scores (True = may attend).
        bias: float tensor broadcastable to the scores (ALiBi, relative positions).
        scale: multiplier on the scores (see above).
        chunk_size: keys per chunk; default keeps batch x L x C near 2^18 score elements.
        return_weights: also return the weights (..., L, S), rebuilt chunk by chunk from the log-sum-exp.

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
    L, S = query.shape[-2], key.shape[-2]
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
    nb = math.prod(batch)
    if chunk_size is None:
        chunk_size = max(16, _BUDGET // max(1, nb * L))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    if mask is not None:
        mask = _masks.as_mask(mask)
    batch_ndim = len(batch)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    M = l_tot = a_tot = None
    spans = [(c0, min(S, c0 + chunk_size)) for c0 in range(0, S, chunk_size)]
    qi = torch.arange(L, device=query.device).unsqueeze(0)  # (1, L)
    allowed_chunks = []
    for c0, c1 in spans:
        allowed = None
        if mask is not None:
            kj = torch.arange(c0, c1, device=query.device).unsqueeze(0)  # (1, C)
            allowed = mask_on_tiles(mask, qi, kj, L, S, batch_ndim).squeeze(-3)  # (*mb, L, C)
        allowed_chunks.append(allowed)
        b_c = _bias_chunk(bias, c0, c1)
        args = (query, key[..., c0:c1, :], value[..., c0:c1, :], b_c, allowed, score, scale)
        if torch.is_grad_enabled():  # keep only the chunk's inputs; recompute its scores in backward
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
    if M is None:  # S == 0: nothing to attend; zero output, still part of the graph (zero gradients)
        out = query.new_zeros(*batch, L, value.shape[-1])
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            out = out + 0.0 * (query.sum() + key.sum() + value.sum())
        return (out, query.new_zeros(*batch, L, 0)) if return_weights else out
    out = (a_tot / torch.where(l_tot > 0, l_tot, torch.ones_like(l_tot))).to(query.dtype)  # (*b, L, Dv)
    if not return_weights:
        return out
    # lse = M + log l (differentiable through l); +inf on empty rows so their weights are exactly 0
    lse = torch.where(l_tot > 0, M + torch.log(torch.where(l_tot > 0, l_tot, torch.ones_like(l_tot))),
                      torch.full_like(l_tot, float("inf")))
    parts = []
    for (c0, c1), allowed in zip(spans, allowed_chunks, strict=True):
        s = _scores_for(score, query, key[..., c0:c1, :], scale).to(acc)
        b_c = _bias_chunk(bias, c0, c1)
        if b_c is not None:
            s = s + b_c.to(acc)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        parts.append(torch.exp(s - lse))  # (*b, L, C)
    weights = torch.cat([p.expand(*batch, L, p.shape[-1]) for p in parts], dim=-1)  # (*b, L, S)
    return out, weights.to(query.dtype)
