"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), feature map phi(x) = elu(x) + 1.

Softmax attention weighs value j by exp(q_i . k_j); linear attention replaces the exponential by a product of
positive features, sim(q, k) = phi(q) . phi(k), so the sum over keys can be taken once and shared by every
query:

    out_i = phi(q_i)^T S / (phi(q_i) . z + eps),   S = sum_j phi(k_j) v_j^T  (D x Dv),   z = sum_j phi(k_j)  (D)

Non-causal: one S for all queries, O(L D Dv). Causal: S and z are prefix sums up to j <= i. Computed in
chunks of C tokens (the "chunked prefix" form): inside a chunk a small C x C masked product, across chunks the
exclusive prefix sum of per-chunk states; O(L C D + L D Dv / C) work and O(L C + L D Dv / C) memory, never
L x S. The recurrent form updates (S, z) one token at a time and gives the causal output: an RNN whose state
has a fixed size, so a token costs the same at position 10 as at position 10,000.

Numerics: phi(x) = elu(x) + 1 > 0, so the normalizer phi(q) . z is positive; ``eps`` keeps it away from zero
when features underflow. States and normalizers are accumulated in float32 (float64 stays float64), and the
output is cast back to the input dtype.

Paper: https://arxiv.org/abs/2006.16236

Shape letters: B batch, H heads, L query length, S key length, D key/query head dim, Dv value head dim,
C chunk length, N number of chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.kernels._contract import check_qkv

__all__ = ["elu_feature_map", "linear_attention", "linear_attention_step", "LinearState"]

LinearState = tuple[Tensor, Tensor]
"""Recurrent state ``(S, z)``: ``S`` (B, H, D, Dv) = sum phi(k) v^T and ``z`` (B, H, D) = sum phi(k)."""


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1: positive everywhere, ~x for large x, ~exp(x) for very negative x."""
    return F.elu(x) + 1.0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    check_qkv(query, key, value)
    if key.shape[:-2] != value.shape[:-2]:
        raise ValueError(
            f"key and value must have the same leading dims; got {tuple(key.shape)} and {tuple(value.shape)}."
        )


def linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    causal: bool = False,
    feature_map: Callable[[Tensor], Tensor] = elu_feature_map,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> Tensor:
    """Linear attention out_i = phi(q_i)^T S / (phi(q_i) . z + eps), non-causal or causal (prefix sums).

    ========  ============================================
    symbol    argument
    ========  ============================================
    q, k, v   ``query``, ``key``, ``value``
    phi       ``feature_map`` (default elu + 1)
    eps       ``eps`` (added to the normalizer)
    C         ``chunk_size`` (causal form only)
    ========  ============================================

    Args:
        query, key, value: floating tensors of one dtype; leading dims of key/value broadcast to the query's.
        causal: if True, query i uses keys j <= i only (requires L == S).
        feature_map: positive feature map applied to query and key.
        eps: added to the normalizer phi(q) . z; must be > 0.
        chunk_size: tokens per chunk of the causal prefix computation (memory O(L * C)).

    Returns:
        ``out`` with the query's leading dims, length L and the value's last dim, in the input dtype.

    Shape:
        query (..., L, D), key (..., S, D), value (..., S, Dv) -> out (..., L, Dv).

    Raises:
        TypeError/ValueError on non-float or mismatched inputs, ``causal`` with L != S, ``eps <= 0`` or
        ``chunk_size < 1``.
    """
    _check_qkv(query, key, value)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps the normalizer away from zero); got {eps}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    L, S = query.shape[-2], key.shape[-2]
    if causal and L != S:
        raise ValueError(
            f"causal linear attention needs L == S (query i sees keys j <= i); got L={L}, S={S}. "
            "To continue a sequence token by token use linear_attention_step with a state."
        )
    out_dtype = query.dtype
    acc = _acc_dtype(out_dtype)
    phi_q = feature_map(query.to(acc))  # (..., L, D)
    phi_k = feature_map(key.to(acc))  # (..., S, D)
    v = value.to(acc)  # (..., S, Dv)
    if not causal:
        # S = sum_j phi(k_j) v_j^T ; z = sum_j phi(k_j)
        kv = phi_k.transpose(-1, -2) @ v  # (..., D, Dv)
        z = phi_k.sum(dim=-2)  # (..., D)
        num = phi_q @ kv  # (..., L, Dv)
        den = (phi_q * z.unsqueeze(-2)).sum(-1, keepdim=True) + eps  # (..., L, 1)
        return (num / den).to(out_dtype)
    return _causal_chunked(phi_q, phi_k, v, eps, chunk_size).to(out_dtype)


def _causal_chunked(phi_q: Tensor, phi_k: Tensor, v: Tensor, eps: float, C: int) -> Tensor:
    """Causal linear attention in chunks of C tokens; inputs already feature-mapped, in the accumulation dtype."""
    lead = torch.broadcast_shapes(phi_q.shape[:-2], phi_k.shape[:-2])
    phi_q = phi_q.expand(*lead, *phi_q.shape[-2:])
    phi_k = phi_k.expand(*lead, *phi_k.shape[-2:])
    v = v.expand(*lead, *v.shape[-2:])
    L, D, Dv = phi_q.shape[-2], phi_q.shape[-1], v.shape[-1]
    if L == 0:
        return v.new_zeros(*lead, 0, Dv)
    C = min(C, L)
    N = -(-L // C)
    pad = N * C - L
    if pad:
        # zero features on padded keys add nothing to S or z; padded query rows are cut off at the end
        phi_q = F.pad(phi_q, (0, 0, 0, pad))
        phi_k = F.pad(phi_k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    qc = phi_q.reshape(*lead, N, C, D)  # (..., N, C, D)
    kc = phi_k.reshape(*lead, N, C, D)  # (..., N, C, D)
    vc = v.reshape(*lead, N, C, Dv)  # (..., N, C, Dv)
    # per-chunk states: S_n = sum_{j in chunk n} phi(k_j) v_j^T, z_n = sum phi(k_j)
    s_chunk = kc.transpose(-1, -2) @ vc  # (..., N, D, Dv)
    z_chunk = kc.sum(dim=-2)  # (..., N, D)
    # exclusive prefix over chunks: state seen by chunk n = sum of chunks < n (shifted, not cumsum - own,
    # which would cancel catastrophically once the prefix is much larger than one chunk)
    s_prev = F.pad(torch.cumsum(s_chunk[..., :-1, :, :], dim=-3), (0, 0, 0, 0, 1, 0))  # (..., N, D, Dv)
    z_prev = F.pad(torch.cumsum(z_chunk[..., :-1, :], dim=-2), (0, 0, 1, 0))  # (..., N, D)
    # inside a chunk: A_ij = phi(q_i) . phi(k_j) for j <= i
    tri = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
    a = (qc @ kc.transpose(-1, -2)).masked_fill(~tri, 0.0)  # (..., N, C, C)
    num = a @ vc + qc @ s_prev  # (..., N, C, Dv)
    den = a.sum(-1) + (qc * z_prev.unsqueeze(-2)).sum(-1) + eps  # (..., N, C)
    out = (num / den.unsqueeze(-1)).reshape(*lead, N * C, Dv)  # (..., N*C, Dv)
    return out[..., :L, :]  # (..., L, Dv)


def linear_attention_step(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    state: LinearState | None = None,
    *,
    feature_map: Callable[[Tensor], Tensor] = elu_feature_map,
    eps: float = 1e-6,
) -> tuple[Tensor, LinearState]:
    """One token of causal linear attention as an RNN: S += phi(k) v^T, z += phi(k), out = phi(q)^T S / (phi(q).z).

    Feeding tokens 0..L-1 one at a time gives the same outputs as ``linear_attention(..., causal=True)``.
    The state has a fixed size, so every step costs O(D Dv) whatever the position.

    Args:
        query, key, value: the current token's projections (no length dim).
        state: ``(S, z)`` from the previous step, or None to start from zeros.
        feature_map, eps: as in :func:`linear_attention`.

    Returns:
        ``(out, (S, z))``: output for this token in the input dtype, and the new state (float32, or float64
        for float64 inputs).

    Shape:
        query (..., D), key (..., D), value (..., Dv) -> out (..., Dv); S (..., D, Dv), z (..., D).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim < 1:
            raise TypeError(f"{name} must be a floating tensor of shape (..., dim); got {t!r:.60}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key must have the same last dim D; got {query.shape[-1]} and {key.shape[-1]}."
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}.")
    acc = _acc_dtype(query.dtype)
    phi_q = feature_map(query.to(acc))  # (..., D)
    phi_k = feature_map(key.to(acc))  # (..., D)
    v = value.to(acc)  # (..., Dv)
    # S_t = S_{t-1} + phi(k_t) v_t^T ; z_t = z_{t-1} + phi(k_t)
    kv = phi_k.unsqueeze(-1) * v.unsqueeze(-2)  # (..., D, Dv)
    if state is None:
        s, z = kv, phi_k
    else:
        if not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError(f"state must be a tuple (S, z) from a previous step or None; got {type(state)}.")
        s_prev, z_prev = state
        if s_prev.shape[-2:] != kv.shape[-2:] or z_prev.shape[-1] != phi_k.shape[-1]:
            raise ValueError(
                f"state shapes S {tuple(s_prev.shape)}, z {tuple(z_prev.shape)} do not match this token's "
                f"(..., {kv.shape[-2]}, {kv.shape[-1]}) and (..., {phi_k.shape[-1]})."
            )
        s, z = s_prev + kv, z_prev + phi_k
    # out_t = phi(q_t)^T S_t / (phi(q_t) . z_t + eps)
    num = (phi_q.unsqueeze(-2) @ s).squeeze(-2)  # (..., Dv)
    den = (phi_q * z).sum(-1, keepdim=True) + eps  # (..., 1)
    return (num / den).to(query.dtype), (s, z)
