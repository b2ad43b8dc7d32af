"""Graph attention layer (GAT): multi-head additive attention along the edges of a graph.

Letters: ``N`` nodes, ``E`` edges (``E'`` after self-loops), ``F`` input features, ``H`` heads, ``D``
features per head (``out_features``). An edge ``j -> i`` is column ``(j, i)`` of ``edge_index`` (row 0 = source
``j``, row 1 = target ``i``, as PyTorch Geometric); node ``i`` attends to its in-neighbours ``j``.

    h_j      = W x_j                                                  (H heads of D features)
    e_ij     = LeakyReLU(a^T [h_i || h_j]) = LeakyReLU(a_dst . h_i + a_src . h_j)
    alpha_ij = softmax_j(e_ij) over the in-edges of i                 (a node with none gets nothing)
    out_i    = ||_heads sum_j alpha_ij h_j     (concat)   or   mean_heads sum_j alpha_ij h_j

Paper: Velickovic et al., "Graph Attention Networks", ICLR 2018, https://arxiv.org/abs/1710.10903
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnkit._checks import check_int, check_probability
from attnkit.kernels.graph import edge_aggregate, edge_softmax

__all__ = ["GATConv", "add_remaining_self_loops"]


def add_remaining_self_loops(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Drop any self-loops of ``edge_index`` and append exactly one loop ``i -> i`` per node.

    Shape:
        edge_index: (2, E) -> (2, E' ) with ``E' = E - (#loops in input) + num_nodes``; loops come last.
    """
    keep = edge_index[0] != edge_index[1]
    loops = torch.arange(num_nodes, device=edge_index.device, dtype=edge_index.dtype)
    return torch.cat([edge_index[:, keep], torch.stack([loops, loops])], dim=1)  # (2, E')


def _check_edge_index(edge_index: object, num_nodes: int) -> Tensor:
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor of shape (2, E); got {type(edge_index).__name__}.")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(
            f"edge_index must have shape (2, E) (row 0 = sources, row 1 = targets); got "
            f"{tuple(edge_index.shape)}. A list of (src, dst) pairs becomes one with torch.tensor(pairs).T."
        )
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise TypeError(f"edge_index must hold integer node ids; got {edge_index.dtype}.")
    edge_index = edge_index.long()
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(
            f"edge_index node ids must lie in [0, N={num_nodes}) where N = x.shape[0]; got range "
            f"[{int(edge_index.min())}, {int(edge_index.max())}]."
        )
    return edge_index


class GATConv(nn.Module):
    """Graph attention layer: each node averages its in-neighbours' projected features with learned weights.

    ``alpha_ij = softmax_j LeakyReLU(a_dst . W x_i + a_src . W x_j)`` over the edges ``j -> i``,
    ``out_i = ||_h sum_j alpha^h_ij W^h x_j`` (``concat=True``) or the mean over heads, plus ``bias``.

    ==========  ============================================
    symbol      argument / parameter
    ==========  ============================================
    ``W``       ``lin.weight`` (F -> H*D, no bias)
    ``a_src``   ``att_src`` (1, H, D): the half of ``a`` that meets ``h_j``
    ``a_dst``   ``att_dst`` (1, H, D): the half of ``a`` that meets ``h_i``
    ``H``       ``heads``;  ``D`` = ``out_features``
    ==========  ============================================

    Args:
        in_features: input size ``F``.
        out_features: features per head ``D``.
        heads: number of attention heads ``H`` (default 8).
        concat: concatenate the heads (output ``H*D``) or average them (output ``D``, the paper's last layer).
        negative_slope: LeakyReLU slope of the scores (0.2 in the paper).
        dropout: dropout probability on the normalised attention weights (training mode only; 0.6 in the
            paper). Dropout on the input features belongs to the model, not to this layer.
        add_self_loops: drop the self-loops already in ``edge_index`` and add one per node, so every node
            also attends to itself (never twice).
        bias: learn an additive bias on the output.
        device, dtype: passed to the parameters.

    Shape:
        - x ``(N, F)``, dense or sparse COO (sparse features skip their zeros)
        - edge_index ``(2, E)`` integer, row 0 = source ``j``, row 1 = target ``i``
        - out ``(N, H*D)`` if ``concat`` else ``(N, D)``
        - with ``return_weights``: ``(out, (edge_index', weights))``, ``edge_index'`` ``(2, E')`` the edges
          actually used (self-loops included) and ``weights`` ``(E', H)`` the coefficients that multiplied
          the features (after dropout in training mode); in eval mode they sum to one over each node's
          in-edges.
        A node with no in-edge (isolated, ``add_self_loops=False``) gets a zero aggregate (plus ``bias``).

    Raises:
        ValueError / TypeError: bad sizes, ``x`` not ``(N, in_features)`` floating point, ``edge_index`` not
            an integer ``(2, E)`` tensor with ids in ``[0, N)``.

    Paper: https://arxiv.org/abs/1710.10903
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        heads: int = 8,
        *,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.6,
        add_self_loops: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.heads = check_int("heads", heads, minimum=1)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise TypeError(f"negative_slope must be a float; got {type(negative_slope).__name__}.")
        self.concat = bool(concat)
        self.negative_slope = float(negative_slope)
        self.dropout = check_probability("dropout", dropout)
        self.add_self_loops = bool(add_self_loops)
        factory = {"device": device, "dtype": dtype}
        self.lin = nn.Linear(in_features, heads * out_features, bias=False, **factory)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_features, **factory))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_features, **factory))
        out_size = heads * out_features if concat else out_features
        self.bias = nn.Parameter(torch.empty(out_size, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot (Xavier) uniform weights, as the paper; zero bias."""
        nn.init.xavier_uniform_(self.lin.weight)
        # a = [a_dst || a_src] is one (2D -> 1) map per head: Glorot bound sqrt(6 / (2D + 1))
        bound = math.sqrt(6.0 / (2 * self.out_features + 1))
        nn.init.uniform_(self.att_src, -bound, bound)
        nn.init.uniform_(self.att_dst, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self, x: Tensor, edge_index: Tensor, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (N, F); got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got {x.dtype}. Convert with .float().")
        if x.layout not in (torch.strided, torch.sparse_coo):
            raise TypeError(f"x must be a dense or sparse COO tensor; got layout {x.layout}. Try x.to_sparse().")
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"x must have shape (N, F) with F = in_features = {self.in_features}; got {tuple(x.shape)}."
            )
        n = x.shape[0]
        edge_index = _check_edge_index(edge_index, n).to(x.device)
        if self.add_self_loops:
            edge_index = add_remaining_self_loops(edge_index, n)  # (2, E')
        src, dst = edge_index[0], edge_index[1]

        # h = W x, split into heads (a sparse x, e.g. bag-of-words features, skips its zeros)
        if x.layout == torch.sparse_coo:
            h = torch.sparse.mm(x, self.lin.weight.T)  # (N, H*D)
        else:
            h = self.lin(x)  # (N, H*D)
        h = h.view(n, self.heads, self.out_features)  # (N, H, D)
        # a_src . h_j and a_dst . h_i, one number per node and head
        alpha_src = (h * self.att_src).sum(dim=-1)  # (N, H)
        alpha_dst = (h * self.att_dst).sum(dim=-1)  # (N, H)
        # e_ij = LeakyReLU(a_dst . h_i + a_src . h_j) for every edge j -> i
        scores = F.leaky_relu(alpha_src[src] + alpha_dst[dst], self.negative_slope)  # (E', H)
        # alpha_ij = softmax over the in-edges of i
        weights = edge_softmax(scores, dst, n)  # (E', H)
        weights = F.dropout(weights, p=self.dropout, training=self.training)  # (E', H)
        # out_i = sum_j alpha_ij h_j
        out = edge_aggregate(weights, h, edge_index, n)  # (N, H, D)
        if self.concat:
            out = out.reshape(n, self.heads * self.out_features)  # (N, H*D)
        else:
            out = out.mean(dim=1)  # (N, D)
        if self.bias is not None:
            out = out + self.bias
        if return_weights:
            return out, (edge_index, weights)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, heads={self.heads}, concat={self.concat}, "
            f"negative_slope={self.negative_slope}, dropout={self.dropout}, "
            f"add_self_loops={self.add_self_loops}, bias={self.bias is not None}"
        )
