"""Float64 plain references for the fast kernels: loops and broadcasts of the equations, nothing from attnkit.

Every function takes float tensors, computes in float64 and returns float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def phi(x: Tensor) -> Tensor:
    # phi(x) = elu(x) + 1, written out: x + 1 for x > 0, exp(x) otherwise
    return torch.where(x > 0, x + 1.0, torch.exp(torch.clamp(x, max=0.0)))


def linear_attention_ref(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, eps: float = 1e-6) -> Tensor:
    """out_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps), j over all (or j <= i)."""
    q, k, v = q.double(), k.double(), v.double()
    L, S = q.shape[-2], k.shape[-2]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for i in range(L):
        hi = i + 1 if causal else S
        # sim_ij = phi(q_i) . phi(k_j)
        sim = (phi(q[..., i : i + 1, :]) * phi(k[..., :hi, :])).sum(-1)  # (..., hi)
        num = (sim.unsqueeze(-1) * v[..., :hi, :]).sum(-2)
        den = sim.sum(-1, keepdim=True) + eps
        out[..., i, :] = num / den
    return out


def masked_softmax_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float | None = None, bias=None
) -> tuple[Tensor, Tensor]:
    """Softmax attention with a boolean mask (True = may attend); rows with no allowed key give zeros.

    q (..., L, D), k (..., S, D), v (..., S, Dv), mask broadcastable to (..., L, S). Returns (out, weights).
    """
    q, k, v = q.double(), k.double(), v.double()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # s_ij = scale * q_i . k_j (+ b_ij)
    s = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * scale
    if bias is not None:
        s = s + bias.double()
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool)
    mask = mask.expand(s.shape)
    # w_ij = exp(s_ij - m_i) / sum_{j allowed} exp(s_ij - m_i), zero when nothing is allowed
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m) * mask
    tot = e.sum(-1, keepdim=True)
    w = e / torch.where(tot > 0, tot, torch.ones_like(tot))
    # out_i = sum_j w_ij v_j
    out = (w.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
    return out, w


def band_mask(L: int, S: int, left: int, right: int) -> Tensor:
    """Explicit band, bottom-right aligned: query i sees key j iff i+S-L-left <= j <= i+S-L+right."""
    m = torch.zeros(L, S, dtype=torch.bool)
    for i in range(L):
        for j in range(S):
            c = i + S - L
            m[i, j] = c - left <= j <= c + right
    return m


def edge_attention_ref(
    scores: Tensor, value: Tensor, edge_index: Tensor, num_nodes: int
) -> tuple[Tensor, Tensor]:
    """Per-destination softmax over edges and the weighted sum of source values, with Python loops.

    scores (E, H), value (N, H, D), edge_index (2, E) with row 0 = source j, row 1 = destination i.
    Returns (weights (E, H), out (N, H, D)); a node with no in-edge gets zeros.
    """
    scores, value = scores.double(), value.double()
    E, H = scores.shape
    w = torch.zeros(E, H, dtype=torch.float64)
    out = torch.zeros(num_nodes, H, value.shape[-1], dtype=torch.float64)
    src, dst = edge_index[0].tolist(), edge_index[1].tolist()
    for i in range(num_nodes):
        edges = [e for e in range(E) if dst[e] == i]
        if not edges:
            continue
        s = scores[edges]  # (n_i, H)
        # alpha_e = exp(s_e) / sum_{e' -> i} exp(s_e')
        a = torch.softmax(s, dim=0)
        w[edges] = a
        for n, e in enumerate(edges):
            out[i] += a[n].unsqueeze(-1) * value[src[e]]
    return w, out


def additive_scores_ref(q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Tensor:
    """a(q_i, k_j) = w_v . tanh(W_q q_i + W_k k_j), with explicit loops over i and j. Returns (..., L, S)."""
    q, k, w_q, w_k, w_v = (t.double() for t in (q, k, w_q, w_k, w_v))
    L, S = q.shape[-2], k.shape[-2]
    out = torch.zeros(*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), L, S, dtype=torch.float64)
    for i in range(L):
        for j in range(S):
            out[..., i, j] = (torch.tanh(q[..., i, :] @ w_q.T + k[..., j, :] @ w_k.T) * w_v).sum(-1)
    return out


def softmax_from_scores_ref(s: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """out = softmax(s | mask) v in float64 (empty rows -> 0)."""
    s, v = s.double(), v.double()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    tot = e.sum(-1, keepdim=True)
    w = e / torch.where(tot > 0, tot, torch.ones_like(tot))
    return w @ v, w
