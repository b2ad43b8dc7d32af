"""THE float64 oracle for attnkit: the equations written out plainly, nothing imported from attnkit.

How to import it: ``tests/conftest.py`` puts the ``tests/`` folder on ``sys.path`` (there is deliberately no
``tests/__init__.py``), so any test file anywhere under ``tests/`` writes::

    from reference import attention_ref, causal_ref, scaled_dot_ref

Every function takes float tensors of any dtype, computes in float64 and returns float64 (masks: bool). The code
is written from the equations with explicit broadcasts and Python loops, never by calling the library or by
copying its tricks (no ``||q||^2 + ||k||^2 - 2 q.k``, no ``W = [W_q | W_k]`` split, no ``masked_fill(-inf)``).

Conventions (the attnkit contract, docs/architecture.md): queries ``(..., L, Dq)``, keys ``(..., S, Dk)``,
values ``(..., S, Dv)``; scores and weights ``(..., L, S)``; boolean masks True = may attend; a query with no
allowed key gets all-zero weights and a zero output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64

# ---- score functions a(q, k) -> (..., L, S) --------------------------------------------------------------


def _pairs(query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Every (query i, key j) pair side by side: q (..., L, 1, Dq), k (..., 1, S, Dk)."""
    return query.to(F64).unsqueeze(-2), key.to(F64).unsqueeze(-3)


def dot_ref(query: Tensor, key: Tensor) -> Tensor:
    # a(q, k) = sum_d q_d k_d
    q, k = _pairs(query, key)
    return (q * k).sum(-1)


def scaled_dot_ref(query: Tensor, key: Tensor, scale: float | None = None) -> Tensor:
    # a(q, k) = q . k / sqrt(d)   (or q . k * scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return dot_ref(query, key) * scale


def general_ref(query: Tensor, key: Tensor, weight: Tensor) -> Tensor:
    # a(q, k) = sum_a sum_b q_a W_ab k_b
    q, k = _pairs(query, key)  # (..., L, 1, Dq), (..., 1, S, Dk)
    w = weight.to(F64)
    return (q.unsqueeze(-1) * w * k.unsqueeze(-2)).sum((-1, -2))


def additive_ref(query: Tensor, key: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Tensor:
    # a(q, k) = sum_h w_v[h] tanh(sum_a W_q[h, a] q_a + sum_b W_k[h, b] k_b)
    q, k = _pairs(query, key)
    wq, wk, wv = w_q.to(F64), w_k.to(F64), w_v.to(F64)
    hq = (q.unsqueeze(-2) * wq).sum(-1)  # (..., L, 1, hidden)
    hk = (k.unsqueeze(-2) * wk).sum(-1)  # (..., 1, S, hidden)
    return (torch.tanh(hq + hk) * wv).sum(-1)


def concat_ref(query: Tensor, key: Tensor, weight: Tensor, v: Tensor | None = None) -> Tensor:
    """Seed 004's rules on the literal concatenation [q_i; k_j]: w^T [q; k], or v^T tanh(W [q; k])."""
    q, k = _pairs(query, key)
    shape = torch.broadcast_shapes(q.shape[:-1], k.shape[:-1])
    cat = torch.cat([q.expand(*shape, q.shape[-1]), k.expand(*shape, k.shape[-1])], dim=-1)  # (..., L, S, Dq+Dk)
    w = weight.to(F64)
    if w.ndim == 1:
        # a(q, k) = sum_c w_c [q; k]_c
        return (cat * w).sum(-1)
    # a(q, k) = sum_h v_h tanh(sum_c W_hc [q; k]_c)
    hidden = (cat.unsqueeze(-2) * w).sum(-1)  # (..., L, S, hidden)
    return (torch.tanh(hidden) * v.to(F64)).sum(-1)


def gaussian_ref(query: Tensor, key: Tensor, w: float | Tensor = 1.0) -> Tensor:
    # a(q, k) = -(w ||q - k||)^2 / 2
    q, k = _pairs(query, key)
    w = w.to(F64) if isinstance(w, Tensor) else w
    dist = torch.sqrt(((q - k) ** 2).sum(-1))
    return -((w * dist) ** 2) / 2


# ---- normalizers -----------------------------------------------------------------------------------------


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def masked_softmax_ref(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax over the last dim restricted to allowed entries, one row at a time; empty rows are all zero."""
    s = scores.to(F64)
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.expand(s.shape)
    out = torch.zeros(s.shape, dtype=F64)  # fresh and contiguous, whatever the strides of ``scores``
    flat_s, flat_m, flat_o = _rows(s), _rows(m), out.view(-1, s.shape[-1])
    for r in range(flat_s.shape[0]):
        allowed = flat_m[r].nonzero().flatten().tolist()
        if not allowed:
            continue  # a query with no allowed key: weights stay 0
        vals = [flat_s[r, j].item() for j in allowed]
        top = max(vals)
        # w_j = exp(s_j - max) / sum_{j' allowed} exp(s_j' - max)
        exps = [math.exp(x - top) for x in vals]
        total = sum(exps)
        for j, e in zip(allowed, exps, strict=True):
            flat_o[r, j] = e / total
    return out


def normalize_ref(scores: Tensor, mask: Tensor | None, kind: str) -> Tensor:
    """``softmax`` over allowed keys, or ``none``/``relu``/``sigmoid`` elementwise and then 0 where masked."""
    if kind == "softmax":
        return masked_softmax_ref(scores, mask)
    s = scores.to(F64)
    fn = {"none": lambda x: x, "relu": lambda x: torch.clamp(x, min=0.0), "sigmoid": lambda x: 1 / (1 + torch.exp(-x))}
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.expand(s.shape)
    # where(mask, f(s), 0): a masked-out NaN/inf never reaches the result
    return torch.where(m, fn[kind](torch.where(m, s, torch.zeros_like(s))), torch.zeros_like(s))


# ---- attention -------------------------------------------------------------------------------------------


def repeat_kv_heads(x: Tensor, num_query_heads: int) -> Tensor:
    """Grouped-query: key/value head ``h // (Hq // Hkv)`` serves query head ``h``; dim -3 holds the heads."""
    hkv = x.shape[-3]
    group = num_query_heads // hkv
    return torch.stack([x[..., h // group, :, :] for h in range(num_query_heads)], dim=-3)


def attention_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    score=None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    normalize: str = "softmax",
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """out = normalize(score(Q, K) * scale + bias, mask) @ V, in float64. Returns ``(out, weights)``.

    ``score`` is one of the ``*_ref`` functions above (default :func:`scaled_dot_ref`, where ``scale`` replaces
    ``1/sqrt(d)``; any other score is multiplied by ``scale``). For 4-D inputs, key/value heads (dim -3) that divide
    the query's are repeated (grouped-query attention). ``mask`` is a dense boolean tensor broadcastable to the scores.
    """
    q, k, v = query.to(F64), key.to(F64), value.to(F64)
    if q.ndim >= 4 and k.shape[-3] != q.shape[-3] and k.shape[-3] != 1:  # heads layout (B, H, L, D) only
        k, v = repeat_kv_heads(k, q.shape[-3]), repeat_kv_heads(v, q.shape[-3])
    if score is None or score is scaled_dot_ref:
        scores = scaled_dot_ref(q, k, scale)
    else:
        scores = score(q, k)
        scores = scores if scale is None else scores * scale
    if bias is not None:
        scores = scores + bias.to(F64)
    if mask is not None:
        mask = mask.expand(torch.broadcast_shapes(mask.shape, scores.shape))
        scores = scores.expand(mask.shape)
    weights = normalize_ref(scores, mask, normalize)  # (..., L, S)
    # out_i = sum_j w_ij v_j; a masked-out v_j (w_ij = 0) is skipped, so NaN there cannot leak
    allowed = (weights != 0).unsqueeze(-1)  # (..., L, S, 1)
    v_j = torch.where(allowed, v.unsqueeze(-3), torch.zeros_like(v).unsqueeze(-3))  # (..., L, S, Dv)
    return (weights.unsqueeze(-1) * v_j).sum(-2), weights


# ---- dense mask builders (True = may attend) --------------------------------------------------------------


def full_ref(L: int, S: int) -> Tensor:
    return torch.ones(L, S, dtype=torch.bool)


def window_ref(L: int, S: int, left: int | None, right: int | None) -> Tensor:
    """Bottom-right aligned band, inclusive: query i sees key j iff c - left <= j <= c + right, c = i + S - L."""
    m = torch.zeros(L, S, dtype=torch.bool)
    for i in range(L):
        c = i + S - L
        for j in range(S):
            m[i, j] = (left is None or j >= c - left) and (right is None or j <= c + right)
    return m


def causal_ref(L: int, S: int) -> Tensor:
    """Bottom-right aligned: query i sees key j iff j <= i + S - L (the last query sees every key)."""
    m = torch.zeros(L, S, dtype=torch.bool)
    for i in range(L):
        for j in range(S):
            m[i, j] = j <= i + S - L
    return m


def padding_ref(lengths, L: int, S: int) -> Tensor:
    """``(B, L, S)``: key j allowed iff j < lengths[b] (``(B,)``) or j < lengths[b][i] (``(B, L)``)."""
    lengths = torch.as_tensor(lengths).tolist()
    B = len(lengths)
    m = torch.zeros(B, L, S, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            n = lengths[b] if not isinstance(lengths[b], list) else lengths[b][i]
            for j in range(S):
                m[b, i, j] = j < n
    return m


def graph_ref(edge_index, num_nodes: int) -> Tensor:
    """Query (target) i sees key (source) j iff some edge j -> i; edge_index[0] = sources, [1] = targets."""
    m = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    src, tgt = torch.as_tensor(edge_index).tolist()
    for j, i in zip(src, tgt, strict=True):
        m[i, j] = True
    return m


def tile_any_ref(dense: Tensor, bq: int, bk: int) -> Tensor:
    """``(ceil(L/bq), ceil(S/bk))``: does tile (a, b) hold any True? Batched masks: union over leading dims."""
    d = dense.reshape(-1, *dense.shape[-2:]).any(0)
    L, S = d.shape
    nq, nk = -(-L // bq), -(-S // bk)
    out = torch.zeros(nq, nk, dtype=torch.bool)
    for a in range(nq):
        for b in range(nk):
            out[a, b] = bool(d[a * bq : (a + 1) * bq, b * bk : (b + 1) * bk].any())
    return out


# ---- test data -------------------------------------------------------------------------------------------


def assert_mixed(mask: Tensor) -> Tensor:
    """Fail unless ``mask`` holds both True and False (a mask test on an all-True mask proves nothing)."""
    assert bool(mask.any()) and not bool(mask.all()), f"mask of shape {tuple(mask.shape)} is not mixed"
    return mask


def random_mask(shape, generator: torch.Generator, p: float = 0.5, *, mixed: bool = True) -> Tensor:
    """Bernoulli(p) boolean mask; with ``mixed`` (and at least 2 entries) it surely holds both True and False."""
    m = torch.rand(shape, generator=generator) < p
    flat = m.view(-1)
    if mixed and flat.numel() >= 2:
        if bool(flat.all()):
            flat[int(torch.randint(flat.numel(), (1,), generator=generator))] = False
        if not bool(flat.any()):
            flat[int(torch.randint(flat.numel(), (1,), generator=generator))] = True
        assert_mixed(m)
    return m


# ---- FlexAttention's model: score_mod and mask_mod on every (b, h, i, j) --------------------------------------


def flex_ref(query: Tensor, key: Tensor, value: Tensor, score_mod=None, mask_mod=None, scale: float | None = None
             ) -> tuple[Tensor, Tensor]:
    """``softmax_j(score_mod(scale q_i . k_j, b, h, i, j) | mask_mod(b, h, i, j)) v_j`` for (B, H, L, D) inputs
    (key/value heads repeated for grouped queries), and the log-sum-exp (B, H, L) (-inf for a row with no key).
    The mods are called once per pair with scalar index tensors, as FlexAttention defines them."""
    B, H, L, D = query.shape
    S = key.shape[-2]
    k = repeat_kv_heads(key, H).to(F64)
    v = repeat_kv_heads(value, H).to(F64)
    q = query.to(F64)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    out = torch.zeros(B, H, L, v.shape[-1], dtype=F64)
    lse = torch.full((B, H, L), float("-inf"), dtype=F64)
    idx = [torch.tensor(n) for n in range(max(B, H, L, S))]
    for b in range(B):
        for h in range(H):
            for i in range(L):
                scores, keep = [], []
                for j in range(S):
                    # s_ij = score_mod(scale q_i . k_j, b, h, i, j)
                    s = (q[b, h, i] * k[b, h, j]).sum() * scale
                    if score_mod is not None:
                        s = score_mod(s, idx[b], idx[h], idx[i], idx[j])
                    scores.append(s)
                    keep.append(True if mask_mod is None else bool(mask_mod(idx[b], idx[h], idx[i], idx[j])))
                allowed = [s for s, ok in zip(scores, keep, strict=True) if ok]
                if not allowed:
                    continue  # no allowed key: zero output
                m = torch.stack(allowed).max()
                # w_ij = exp(s_ij - m) / sum_j' exp(s_ij' - m) over allowed j
                e = [torch.exp(s - m) if ok else torch.zeros((), dtype=F64) for s, ok in zip(scores, keep, strict=True)]
                total = torch.stack(e).sum()
                out[b, h, i] = sum(e[j] / total * v[b, h, j] for j in range(S))
                lse[b, h, i] = m + torch.log(total)
    return out, lse
