"""Edge-list attention: attend only along the edges of a graph, O(E) memory, never an N x N tensor.

Node i attends to node j iff there is an edge j -> i (``edge_index[0]`` = source j, ``edge_index[1]`` =
destination i, as PyTorch Geometric and ``attnkit.masks.graph``). With one score s_e per edge e = (j -> i):

    alpha_e = exp(s_e - m_i) / sum_{e' -> i} exp(s_e' - m_i)       (edge_softmax, m_i = max over i's in-edges)
    out_i   = sum_{e = (j -> i)} alpha_e v_j                        (edge_aggregate)

A node with no in-edge gets zero output (and no weights); an edge whose score is -inf gets weight 0.
Each step is a ``torch.autograd.Function`` whose backward saves only per-edge scalars (E, H) and per-node
tensors (N, H, D), never the gathered (E, H, D) values:

    d s_e = alpha_e (g_e - sum_{e' -> i} alpha_e' g_e')              (softmax backward, g = d alpha)
    d alpha_e = <d out_i, v_j>,   d v_j = sum_{e = (j -> i)} alpha_e d out_i

``graph_attention`` (dot-product scores) runs all three steps in one fused Function over the edges sorted by
destination (CSR order, sorted once and remembered for the last ``edge_index``; an already sorted list, such as
``torch.unique``'s output, is used as is): the per-node max is a segment max, the softmax backward uses
``sum_{e -> i} alpha_e d alpha_e = <d out_i, out_i>`` (as FlashAttention), and the backward recomputes the
gathered rows instead of saving them:

    d s_e = alpha_e (<d out_i, v_j> - <d out_i, out_i>)
    d q_i = scale sum_{e = (j -> i)} d s_e k_j ;  d k_j = scale sum_{e = (j -> i)} d s_e q_i

Paper (attention along edges): Velickovic et al. 2018, https://arxiv.org/abs/1710.10903

Shape letters: N nodes, E edges, H heads (any trailing dims of the scores are treated as heads), D head dim.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

__all__ = ["edge_softmax", "edge_aggregate", "edge_dot", "graph_attention"]


def _check_index(name: str, index: Tensor, E: int, num_nodes: int) -> Tensor:
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be an integer tensor; got {type(index).__name__}.")
    if index.is_floating_point() or index.dtype == torch.bool or index.is_complex():
        raise TypeError(f"{name} must hold integer node ids; got {index.dtype}.")
    if index.shape[-1] != E:
        raise ValueError(f"{name} must have E = {E} entries along its last dim; got shape {tuple(index.shape)}.")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_nodes):
        raise ValueError(
            f"{name} node ids must lie in [0, num_nodes={num_nodes}); got [{int(index.min())}, {int(index.max())}]."
        )
    return index.long()


def _check_num_nodes(num_nodes: object) -> int:
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
        raise ValueError(f"num_nodes must be a non-negative int; got {num_nodes!r}.")
    return num_nodes


class _EdgeSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, index: Tensor, num_nodes: int) -> Tensor:
        E = scores.shape[0]
        rest = scores.shape[1:]
        acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
        s = scores.to(acc).reshape(E, math.prod(rest))  # (E, H)
        idx = index.view(E, 1).expand_as(s)  # (E, H)
        # m_i = max_{e -> i} s_e  (groups with no edge, or only -inf, use 0 so nothing becomes NaN)
        m = s.new_full((num_nodes, s.shape[1]), float("-inf"))
        m = m.scatter_reduce(0, idx, s, reduce="amax", include_self=True)  # (N, H)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m.index_select(0, index))  # (E, H)
        # Z_i = sum_{e -> i} exp(s_e - m_i)
        z = s.new_zeros(num_nodes, s.shape[1]).index_add_(0, index, e)  # (N, H)
        z = torch.where(z > 0, z, torch.ones_like(z))
        w = (e / z.index_select(0, index)).to(scores.dtype)  # (E, H)
        ctx.save_for_backward(w, index)
        ctx.num_nodes = num_nodes
        return w.reshape(E, *rest)

    @staticmethod
    def backward(ctx, grad_w: Tensor):
        w, index = ctx.saved_tensors
        E = w.shape[0]
        g = grad_w.reshape(E, w.shape[1]).to(w.dtype)  # (E, H)
        # d s_e = alpha_e (g_e - sum_{e' -> i} alpha_e' g_e')
        dot = w.new_zeros(ctx.num_nodes, w.shape[1]).index_add_(0, index, w * g)  # (N, H)
        ds = w * (g - dot.index_select(0, index))  # (E, H)
        return ds.reshape(grad_w.shape), None, None


def edge_softmax(scores: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """Softmax of edge scores over the edges that share a destination node.

    alpha_e = exp(s_e) / sum_{e' : index[e'] = index[e]} exp(s_e')

    Args:
        scores: float scores, one row per edge (any trailing dims, e.g. heads).
        index: destination node of each edge (``edge_index[1]``).
        num_nodes: number of nodes N (ids in ``[0, N)``).

    Returns:
        weights with the shape and dtype of ``scores``; each destination's weights sum to 1 (0 if all -inf).

    Shape:
        scores (E, H...), index (E,) -> weights (E, H...).

    Raises:
        TypeError/ValueError for non-float scores, non-integer or out-of-range ``index``, or length mismatch.
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.ndim < 1:
        raise TypeError(f"scores must be a floating tensor of shape (E, H...); got {scores!r:.80}.")
    num_nodes = _check_num_nodes(num_nodes)
    if not isinstance(index, Tensor) or index.ndim != 1:
        raise ValueError(f"index must be a 1-D tensor of destination ids (E,); got {index!r:.80}.")
    index = _check_index("index", index, scores.shape[0], num_nodes)
    return _EdgeSoftmax.apply(scores, index, num_nodes)


class _EdgeAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: Tensor, value: Tensor, src: Tensor, dst: Tensor, num_nodes: int) -> Tensor:
        # out_i = sum_{e=(j->i)} alpha_e v_j, in chunks of edges so the gathered (chunk, H, D) stays small
        out = value.new_zeros(num_nodes, *value.shape[1:])  # (N, H, D)
        for lo, hi in _edge_chunks(src.shape[0], value[0].numel() if value.shape[0] else 1):
            msg = value.index_select(0, src[lo:hi]) * weights[lo:hi].unsqueeze(-1)  # (e, H, D)
            out.index_add_(0, dst[lo:hi], msg)
        ctx.save_for_backward(weights, value, src, dst)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weights, value, src, dst = ctx.saved_tensors
        need_w, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dw = torch.empty_like(weights) if need_w else None
        dv = torch.zeros_like(value) if need_v else None
        for lo, hi in _edge_chunks(src.shape[0], value[0].numel() if value.shape[0] else 1):
            g = grad_out.index_select(0, dst[lo:hi])  # (e, H, D)
            if need_w:
                # d alpha_e = <d out_i, v_j>
                dw[lo:hi] = (g * value.index_select(0, src[lo:hi])).sum(-1)
            if need_v:
                # d v_j = sum_{e=(j->i)} alpha_e d out_i
                dv.index_add_(0, src[lo:hi], g * weights[lo:hi].unsqueeze(-1))
        return dw, dv, None, None, None


def _edge_chunks(E: int, row: int, budget: int = 1 << 22):
    step = max(1, budget // max(1, row))
    for lo in range(0, E, step):
        yield lo, min(E, lo + step)


def _check_edge_index(edge_index: Tensor, num_nodes: int) -> Tensor:
    if not isinstance(edge_index, Tensor) or edge_index.ndim != 2 or edge_index.shape[0] != 2:
        shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"edge_index must have shape (2, E) (sources, destinations); got {shape}.")
    return _check_index("edge_index", edge_index, edge_index.shape[1], num_nodes)


def edge_aggregate(weights: Tensor, value: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """Weighted sum of source values into destination nodes: out_i = sum_{e=(j->i)} w_e v_j.

    Args:
        weights: per-edge, per-head weights (e.g. from :func:`edge_softmax`).
        value: node values.
        edge_index: ``(2, E)``, row 0 = source j, row 1 = destination i.
        num_nodes: number of destination nodes N (rows of the output).

    Returns:
        ``out`` (N, H, D); nodes with no in-edge are zero.

    Shape:
        weights (E, H), value (Nsrc, H, D), edge_index (2, E) -> out (N, H, D).
    """
    num_nodes = _check_num_nodes(num_nodes)
    for name, t in (("weights", weights), ("value", value)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor; got {t!r:.80}.")
    if value.ndim != 3 or weights.ndim != 2 or weights.shape[1] != value.shape[1]:
        raise ValueError(
            f"weights must be (E, H) and value (N, H, D) with the same H; got {tuple(weights.shape)} and "
            f"{tuple(value.shape)}."
        )
    if weights.dtype != value.dtype:
        raise TypeError(f"weights and value must share a dtype; got {weights.dtype} and {value.dtype}.")
    if not isinstance(edge_index, Tensor) or edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E); got {edge_index!r:.80}.")
    src = _check_index("edge_index[0]", edge_index[0], weights.shape[0], value.shape[0])
    dst = _check_index("edge_index[1]", edge_index[1], weights.shape[0], num_nodes)
    return _EdgeAggregate.apply(weights, value, src, dst, num_nodes)


class _EdgeDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, src: Tensor, dst: Tensor, scale: float) -> Tensor:
        # s_e = scale * <q_i, k_j> for e = (j -> i), in chunks of edges
        E = src.shape[0]
        s = query.new_empty(E, query.shape[1])  # (E, H)
        for lo, hi in _edge_chunks(E, query[0].numel() if query.shape[0] else 1):
            s[lo:hi] = (query.index_select(0, dst[lo:hi]) * key.index_select(0, src[lo:hi])).sum(-1) * scale
        ctx.save_for_backward(query, key, src, dst)
        ctx.scale = scale
        return s

    @staticmethod
    def backward(ctx, grad_s: Tensor):
        query, key, src, dst = ctx.saved_tensors
        dq = torch.zeros_like(query) if ctx.needs_input_grad[0] else None
        dk = torch.zeros_like(key) if ctx.needs_input_grad[1] else None
        for lo, hi in _edge_chunks(src.shape[0], query[0].numel() if query.shape[0] else 1):
            g = grad_s[lo:hi].unsqueeze(-1) * ctx.scale  # (e, H, 1)
            if dq is not None:
                dq.index_add_(0, dst[lo:hi], g * key.index_select(0, src[lo:hi]))
            if dk is not None:
                dk.index_add_(0, src[lo:hi], g * query.index_select(0, dst[lo:hi]))
        return dq, dk, None, None, None


def edge_dot(query: Tensor, key: Tensor, edge_index: Tensor, *, scale: float = 1.0) -> Tensor:
    """Dot-product score per edge: s_e = scale * <q_i, k_j> for e = (j -> i). O(E H) memory.

    Shape:
        query (N, H, D), key (Nsrc, H, D), edge_index (2, E) -> scores (E, H).
    """
    if query.ndim != 3 or key.ndim != 3 or query.shape[1:] != key.shape[1:]:
        raise ValueError(
            f"query and key must be (N, H, D) with the same H and D; got {tuple(query.shape)} and "
            f"{tuple(key.shape)}."
        )
    if not isinstance(edge_index, Tensor) or edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E); got {edge_index!r:.80}.")
    src = _check_index("edge_index[0]", edge_index[0], edge_index.shape[1], key.shape[0])
    dst = _check_index("edge_index[1]", edge_index[1], edge_index.shape[1], query.shape[0])
    return _EdgeDot.apply(query, key, src, dst, float(scale))


# ---- fused dot-product attention along edges ------------------------------------------------------------------

class _Structure:
    """Edges sorted by destination (CSR order): ``src``, ``dst`` (E,), ``counts`` (N,) in-edges per node, and
    ``perm`` (E,) sorted position -> original edge id (None when the input was already sorted)."""

    def __init__(self, src: Tensor, dst: Tensor, num_nodes: int):
        self.perm = None
        if dst.numel() > 1 and not bool((dst[1:] >= dst[:-1]).all()):
            self.perm = torch.argsort(dst, stable=True)  # (E,)
            src, dst = src.index_select(0, self.perm), dst.index_select(0, self.perm)
        self.src, self.dst, self.num_nodes = src, dst, num_nodes
        self.counts = torch.bincount(dst, minlength=num_nodes)  # (N,)

    def inverse(self) -> Tensor:
        """Original edge id -> sorted position (E,)."""
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.perm.numel(), device=self.perm.device)
        return inv


_LAST: list = [None]  # (weakref to edge_index, (version, N, N_src, device), _Structure): the last one built


def _structure(edge_index: Tensor, num_nodes: int, num_src: int) -> _Structure:
    """Checked, sorted structure of ``edge_index`` (destinations < num_nodes, sources < num_src), reused while
    the same unmodified tensor comes again (a module calling with one graph pays the sort once)."""
    key = (edge_index._version, num_nodes, num_src, edge_index.device) if isinstance(edge_index, Tensor) else None
    hit = _LAST[0]
    if hit is not None and hit[0]() is edge_index and hit[1] == key:
        return hit[2]
    if num_src == num_nodes:
        ei = _check_edge_index(edge_index, num_nodes)
        src, dst = ei[0], ei[1]
    else:
        _check_edge_index(edge_index, max(num_nodes, num_src))
        src = _check_index("edge_index[0]", edge_index[0], edge_index.shape[1], num_src)
        dst = _check_index("edge_index[1]", edge_index[1], edge_index.shape[1], num_nodes)
    st = _Structure(src, dst, num_nodes)
    _LAST[0] = (weakref.ref(edge_index), key, st)
    return st


def _rowsum(x: Tensor) -> Tensor:
    """sum_d x[..., d] as a matrix-vector product (much faster than a sum over a short last dim).

    Shape: (..., D) -> (...).
    """
    D = x.shape[-1]
    return (x.reshape(-1, D) @ x.new_ones(D)).view(x.shape[:-1])  # (...)


class _GraphAttention(torch.autograd.Function):
    """out, alpha = attention along sorted edges; saves q, k, v, out, alpha (E, H) and the structure."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, st: _Structure, scale: float):
        N, H = q.shape[0], q.shape[1]
        src, dst = st.src, st.dst
        # s_e = scale <q_i, k_j> for e = (j -> i)
        s = _rowsum(q.index_select(0, dst).mul_(k.index_select(0, src))).mul_(scale)  # (E, H)
        # m_i = max over i's in-edges (0 for a node with none)
        if N:
            m = torch.segment_reduce(s, "max", lengths=st.counts, axis=0)  # (N, H)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        else:
            m = s.new_zeros(0, H)
        e = s.sub_(m.index_select(0, dst)).exp_()  # (E, H)
        # alpha_e = exp(s_e - m_i) / sum_{e' -> i} exp(s_e' - m_i); Z_i >= 1 wherever an edge exists
        z = e.new_zeros(N, H).index_add_(0, dst, e)  # (N, H)
        w = e.div_(z.index_select(0, dst))  # (E, H)
        # out_i = sum_{e = (j -> i)} alpha_e v_j
        out = v.new_zeros(N, H, v.shape[-1]).index_add_(0, dst, v.index_select(0, src).mul_(w.unsqueeze(-1)))
        ctx.save_for_backward(q, k, v, out, w)
        ctx.st, ctx.scale = st, scale
        ctx.set_materialize_grads(False)
        return out, w

    @staticmethod
    def backward(ctx, dout: Tensor | None, dw_ext: Tensor | None):
        q, k, v, out, w = ctx.saved_tensors
        src, dst = ctx.st.src, ctx.st.dst
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(out.dtype).contiguous()
        gd = dout.index_select(0, dst)  # (E, H, Dv): d out_i per edge
        # d alpha_e = <d out_i, v_j>  (+ the caller's gradient on the weights)
        da = _rowsum(v.index_select(0, src).mul_(gd))  # (E, H)
        dv = v.new_zeros(v.shape).index_add_(0, src, gd.mul_(w.unsqueeze(-1))) if need_v else None  # d v_j
        # sum_{e -> i} alpha_e d alpha_e = <d out_i, out_i>  (+ the weights' own term)
        delta = _rowsum(dout * out)  # (N, H)
        if dw_ext is not None:
            dw_ext = dw_ext.to(w.dtype)
            da = da.add_(dw_ext)
            delta = delta.index_add_(0, dst, w * dw_ext)
        # d s_e = alpha_e (d alpha_e - sum_{e' -> i} alpha_e' d alpha_e'), times scale for q and k
        ds = da.sub_(delta.index_select(0, dst)).mul_(w).mul_(ctx.scale).unsqueeze(-1)  # (E, H, 1)
        dq = q.new_zeros(q.shape).index_add_(0, dst, k.index_select(0, src).mul_(ds)) if need_q else None
        dk = k.new_zeros(k.shape).index_add_(0, src, q.index_select(0, dst).mul_(ds)) if need_k else None
        return dq, dk, dv, None, None


def graph_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    edge_index: Tensor,
    *,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention along edges: out_i = sum_{e=(j->i)} softmax_e(scale q_i . k_j) v_j.

    ========  =====================================
    symbol    argument
    ========  =====================================
    q, k, v   ``query``, ``key``, ``value``
    j -> i    ``edge_index[:, e] = (j, i)``
    scale     ``scale`` (default 1/sqrt(D))
    ========  =====================================

    Args:
        query, key, value: node features per head, one dtype.
        edge_index: ``(2, E)`` integer tensor, row 0 = source j (key), row 1 = destination i (query).
        scale: multiplies the dot products; default ``1 / sqrt(D)``.
        return_weights: also return the per-edge weights alpha (E, H) (sparse, aligned with ``edge_index``).

    Returns:
        ``out`` (N, H, Dv), or ``(out, weights (E, H))``. Nodes with no in-edge get zero output.

    Shape:
        query (N, H, D), key (N, H, D), value (N, H, Dv), edge_index (2, E) -> (N, H, Dv).

    Raises:
        TypeError/ValueError on mismatched shapes/dtypes or out-of-range edge ids.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (N, H, D); got {t!r:.80}.")
        if t.ndim != 3:
            raise ValueError(f"{name} must have shape (N, H, D); got {tuple(t.shape)}.")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key, value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}.")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key and value must agree on (N, H); got {tuple(key.shape)} and {tuple(value.shape)}.")
    if query.shape[1:] != key.shape[1:]:
        raise ValueError(f"query and key must agree on (H, D); got {tuple(query.shape)} and {tuple(key.shape)}.")
    N = query.shape[0]
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    st = _structure(edge_index, N, key.shape[0])
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(acc).contiguous() for t in (query, key, value))  # (N, H, D): rows gathered per edge
    out, w = _GraphAttention.apply(q, k, v, st, float(scale))  # (N, H, Dv), (E, H) in sorted order
    out = out.to(query.dtype)
    if not return_weights:
        return out
    if st.perm is not None:
        w = w.index_select(0, st.inverse())  # (E, H) in the caller's edge order
    return out, w.to(query.dtype)


# ---- the kernel contract (attnkit.kernels._contract) ---------------------------------------------------------

def supports(query, key, value, *, mask=None, return_lse=False, **request) -> str | None:
    from attnkit.kernels._contract import softmax_dot_reason

    reason = softmax_dot_reason(**request)
    if reason:
        return reason
    if mask is None or query.shape[-2] != key.shape[-2] or mask.edges(query.shape[-2]) is None:
        return f"it needs a graph mask (masks.graph(edge_index, num_nodes=N)) with L == S; got {mask!r}"
    if return_lse:
        return "it does not return the log-sum-exp; use backend='blocksparse'"
    return None


def suits(query, key, value, **_) -> bool:
    return True


def _unique_edges(ei: Tensor, N: int) -> Tensor:
    """A dense mask counts an edge once: drop duplicate edges so both agree. Sorted by destination, which the
    kernel then uses as is. ``(2, E)`` sources, destinations."""
    flat = torch.unique(ei[1] * max(N, 1) + ei[0])  # (E,): 1-D unique is much faster than unique(dim=1)
    return torch.stack([flat % max(N, 1), flat // max(N, 1)])


def run(query, key, value, *, score, mask, scale, return_weights, **_):
    from attnkit.kernels._contract import dot_scale

    N = query.shape[-2]
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
    nb = math.prod(batch)
    D, Dv = query.shape[-1], value.shape[-1]
    q = query.expand(*batch, N, D).reshape(nb, N, D).transpose(0, 1)  # (N, nb, D)
    k = key.expand(*batch, N, D).reshape(nb, N, D).transpose(0, 1)  # (N, nb, D)
    v = value.expand(*batch, N, Dv).reshape(nb, N, Dv).transpose(0, 1)  # (N, nb, Dv)
    edge_index = mask.remember(("edges", N, str(query.device)),
                               lambda: _unique_edges(mask.edges(N).to(query.device), N))  # (2, E)
    out, w = graph_attention(q, k, v, edge_index, scale=dot_scale(query, score, scale), return_weights=True)
    out = out.transpose(0, 1).reshape(*batch, N, Dv)  # (*b, N, Dv)
    if not return_weights:
        return out, None, None
    idx = (torch.arange(nb, device=w.device).view(-1, 1), edge_index[1], edge_index[0])
    if return_weights == "sparse":
        ii = torch.stack([idx[0].expand(nb, edge_index.shape[1]).flatten(),
                          edge_index[1].repeat(nb), edge_index[0].repeat(nb)])
        sp = torch.sparse_coo_tensor(ii, w.transpose(0, 1).flatten(), (nb, N, N)).coalesce()
        return out, sp if len(batch) == 1 else _reshape_sparse(sp, batch), None
    dense = w.new_zeros(nb, N, N).index_put(idx, w.transpose(0, 1), accumulate=True)  # (nb, N, N)
    return out, dense.reshape(*batch, N, N), None


def _reshape_sparse(sp: Tensor, batch: tuple) -> Tensor:
    """A (nb, N, N) sparse COO tensor as (*batch, N, N)."""
    idx, vals = sp.indices(), sp.values()
    coords, rem = [], idx[0]
    for size in reversed(batch):
        coords.append(rem % size)
        rem = rem // size
    full = torch.stack([*reversed(coords), idx[1], idx[2]])
    return torch.sparse_coo_tensor(full, vals, (*batch, *sp.shape[1:])).coalesce()
