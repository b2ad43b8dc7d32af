"""The graph recipe's attention explorer: a GAT's attention over one node's neighbourhood, edge opacity = weight.

The neighbourhood is the node and the nodes within ``hops`` edges of it (breadth first, at most ``max_nodes``);
every attention edge between two of them is kept, per head and layer, as a sparse ``(H, N, N)`` tensor: row i =
the node that attends (the edge's target), column j = the neighbour it reads (the source).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def neighbourhood(edge_index: Tensor, center: int, *, hops: int = 2, max_nodes: int = 40) -> list[int]:
    """``center`` and the nodes within ``hops`` edges of it (either direction), nearest first, at most
    ``max_nodes``."""
    nbrs: dict[int, set[int]] = {}
    for a, b in edge_index.T.tolist():
        nbrs.setdefault(a, set()).add(b)
        nbrs.setdefault(b, set()).add(a)
    seen, frontier = [center], [center]
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for m in sorted(nbrs.get(n, ())):
                if m not in seen and len(seen) < max_nodes:
                    seen.append(m)
                    nxt.append(m)
        frontier = nxt
    return seen


def subgraph_weights(edge_index: Tensor, weights: Tensor, nodes: list[int]) -> Tensor:
    """The attention among ``nodes`` as a sparse COO ``(H, N, N)``: entry (h, i, j) = weight of edge nodes[j] ->
    nodes[i] in head h. ``edge_index (2, E)`` holds (source, target); ``weights (E, H)``."""
    local = torch.full((int(edge_index.max()) + 1,), -1, dtype=torch.long)
    local[torch.tensor(nodes)] = torch.arange(len(nodes))
    src, dst = local[edge_index[0]], local[edge_index[1]]
    keep = (src >= 0) & (dst >= 0)
    src, dst, w = src[keep], dst[keep], weights[keep]  # (E',), (E',), (E', H)
    H, E = w.shape[1], w.shape[0]
    idx = torch.stack([torch.arange(H).repeat_interleave(E), dst.repeat(H), src.repeat(H)])  # (3, H * E')
    return torch.sparse_coo_tensor(idx, w.T.reshape(-1), (H, len(nodes), len(nodes)),
                                   check_invariants=False).coalesce()


@torch.no_grad()
def write_attention_html(path: str | Path, model, data, x: Tensor, *, center: int | None = None,
                         hops: int = 2, max_nodes: int = 40) -> Path:
    """The explorer of both GAT layers' attention around ``center`` (default: the node with most edges)."""
    import networkx as nx

    from attnkit.viz.explorer import Explorer

    model.eval()
    _, (ei1, w1), (ei2, w2) = model(x, data.edge_index, return_weights=True)
    if center is None:
        center = int(torch.bincount(data.edge_index[1], minlength=data.num_nodes).argmax())
    nodes = neighbourhood(data.edge_index, center, hops=hops, max_nodes=max_nodes)
    tokens = [str(n) for n in nodes]
    g = nx.Graph()
    g.add_nodes_from(range(len(nodes)))
    layer1 = subgraph_weights(ei1, w1, nodes)
    g.add_edges_from((i, j) for i, j in layer1.indices()[1:].T.tolist() if i != j)
    pos = nx.spring_layout(g, seed=0)
    page = Explorer(title=f"attnkit graph: GAT attention around node {center} of {data.name}")
    page.add(tokens, {"GAT": [layer1, subgraph_weights(ei2, w2, nodes)]}, center=0,
             positions=[pos[i] for i in range(len(nodes))],
             name=f"node {center} and {len(nodes) - 1} nodes within {hops} edges")
    return page.write(path)
