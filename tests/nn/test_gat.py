"""GATConv against a float64 dense-adjacency reference written here (masked softmax over a dense N x N grid)."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn.gat import GATConv


def ref_gat(x, edge_index, layer, *, add_self_loops):
    """Plain GAT in float64 on a dense adjacency: A[i, j] = edge j -> i; returns out and P (H, N, N)."""
    x = x.double()
    n = x.shape[0]
    heads, d = layer.heads, layer.out_features
    adj = torch.zeros(n, n, dtype=torch.bool)
    for j, i in edge_index.T.tolist():
        adj[i, j] = True
    if add_self_loops:
        adj |= torch.eye(n, dtype=torch.bool)
    # h = W x
    h = (x @ layer.lin.weight.detach().double().T).reshape(n, heads, d)
    out = torch.zeros(n, heads, d, dtype=torch.float64)
    p_all = torch.zeros(heads, n, n, dtype=torch.float64)
    for k in range(heads):
        a_src = layer.att_src.detach().double()[0, k]
        a_dst = layer.att_dst.detach().double()[0, k]
        # e_ij = LeakyReLU(a_dst . h_i + a_src . h_j)
        e = (h[:, k] @ a_dst)[:, None] + (h[:, k] @ a_src)[None, :]
        e = torch.where(e > 0, e, layer.negative_slope * e)
        for i in range(n):
            js = adj[i].nonzero().flatten()
            if len(js) == 0:
                continue  # no in-edge: zero weights, zero output
            w = torch.exp(e[i, js] - e[i, js].max())
            p_all[k, i, js] = w / w.sum()
        # out_i = sum_j alpha_ij h_j
        out[:, k] = p_all[k] @ h[:, k]
    out = out.reshape(n, heads * d) if layer.concat else out.mean(dim=1)
    if layer.bias is not None:
        out = out + layer.bias.detach().double()
    return out, p_all


def _graph():
    # 7 nodes: node 6 isolated, a self-loop already on node 2 and on node 4, a directed chain and a cycle
    edges = [(0, 1), (1, 0), (1, 2), (2, 2), (3, 2), (0, 3), (4, 4), (5, 4), (3, 5), (2, 5), (0, 5)]
    return torch.tensor(edges).T, 7


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("add_self_loops", [True, False])
def test_forward_matches_dense_reference(concat, add_self_loops):
    torch.manual_seed(0)
    edge_index, n = _graph()
    layer = GATConv(5, 3, heads=4, concat=concat, add_self_loops=add_self_loops).double().eval()
    with torch.no_grad():
        layer.bias.normal_()  # a non-zero bias, so the test sees where it is added
    x = torch.randn(n, 5, dtype=torch.float64)
    out, (ei, w) = layer(x, edge_index, return_weights=True)
    ref, p = ref_gat(x, edge_index, layer, add_self_loops=add_self_loops)
    assert out.shape == ((n, 12) if concat else (n, 3))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # every returned weight is the dense reference's coefficient of its edge (src j -> dst i is P[:, i, j])
    torch.testing.assert_close(w, p[:, ei[1], ei[0]].T, rtol=1e-10, atol=1e-10)
    assert (p > 0).any() and (p == 0).any()  # the reference really masks


def test_self_loops_are_not_duplicated():
    edge_index, n = _graph()
    layer = GATConv(5, 2, heads=2).eval()
    _, (ei, w) = layer(torch.randn(n, 5), edge_index, return_weights=True)
    loops = ei[:, ei[0] == ei[1]]
    assert sorted(loops[0].tolist()) == list(range(n))  # exactly one loop per node
    non_loops_in = int((edge_index[0] != edge_index[1]).sum())
    assert ei.shape[1] == non_loops_in + n
    assert w.shape == (ei.shape[1], 2)


def test_weights_sum_to_one_over_in_edges_and_isolated_node_gets_nothing():
    torch.manual_seed(1)
    edge_index, n = _graph()
    layer = GATConv(5, 2, heads=3, add_self_loops=False, bias=True).eval()
    x = torch.randn(n, 5) * 10  # large scores
    out, (ei, w) = layer(x, edge_index, return_weights=True)
    sums = torch.zeros(n, 3).index_add(0, ei[1], w)
    has_in = torch.zeros(n, dtype=torch.bool)
    has_in[ei[1]] = True
    assert not has_in[6] and has_in[:6].all()
    torch.testing.assert_close(sums[has_in], torch.ones(int(has_in.sum()), 3))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[6], layer.bias.detach())  # zero aggregate + bias, not NaN


def test_isolated_node_with_self_loop_sees_only_itself():
    torch.manual_seed(2)
    edge_index, n = _graph()
    layer = GATConv(5, 4, heads=2, bias=False).eval()
    x = torch.randn(n, 5)
    out = layer(x, edge_index)
    torch.testing.assert_close(out[6], layer.lin(x[6]))  # weight 1 on its own loop


def test_no_edges_at_all():
    layer = GATConv(3, 2, heads=2, add_self_loops=False).eval()
    out = layer(torch.randn(4, 3), torch.empty(2, 0, dtype=torch.long))
    torch.testing.assert_close(out, layer.bias.detach().expand(4, 4))


def test_gradcheck_float64_tiny_graph():
    torch.manual_seed(3)
    edge_index, n = _graph()
    layer = GATConv(4, 2, heads=2, dropout=0.0).double()
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    params = (layer.lin.weight, layer.att_src, layer.att_dst)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x, edge_index), (x, *params), eps=1e-6, atol=1e-6)


def test_attention_dropout_in_training_only():
    torch.manual_seed(4)
    n = 60
    edge_index = torch.randint(0, n, (2, 2000))
    layer = GATConv(4, 2, heads=4, dropout=0.5)
    x = torch.randn(n, 4)
    layer.eval()
    _, (_, w_eval) = layer(x, edge_index, return_weights=True)
    layer.train()
    torch.manual_seed(7)
    out1, (_, w_train) = layer(x, edge_index, return_weights=True)
    torch.manual_seed(7)
    out2 = layer(x, edge_index)
    torch.testing.assert_close(out1, out2)  # same seed, same output
    dropped = (w_train == 0).float().mean().item()
    assert abs(dropped - 0.5) < 0.02
    kept = w_train != 0
    torch.testing.assert_close(w_train[kept], w_eval[kept] * 2)  # inverted dropout scaling


def test_float32_close_to_float64_reference():
    torch.manual_seed(5)
    n = 40
    edge_index = torch.randint(0, n, (2, 200))
    edge_index = torch.unique(edge_index, dim=1)  # the dense reference counts an edge once
    layer = GATConv(16, 8, heads=8).eval()
    x = torch.randn(n, 16)
    ref, _ = ref_gat(x, edge_index, layer, add_self_loops=True)
    torch.testing.assert_close(layer(x, edge_index).double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    layer = GATConv(4, 2, heads=2)
    ei = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"x must have shape \(N, F\) with F = in_features = 4"):
        layer(torch.randn(2, 3), ei)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(2, 4, dtype=torch.long), ei)
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        layer(torch.randn(2, 4), ei.T.reshape(4, 1))
    with pytest.raises(TypeError, match="edge_index must hold integer"):
        layer(torch.randn(2, 4), ei.float())
    with pytest.raises(ValueError, match=r"node ids must lie in \[0, N=2\)"):
        layer(torch.randn(2, 4), torch.tensor([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="dropout"):
        GATConv(4, 2, dropout=1.5)
    with pytest.raises(ValueError, match="heads"):
        GATConv(4, 2, heads=0)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_features_give_the_dense_result_and_gradients():
    torch.manual_seed(6)
    edge_index, n = _graph()
    layer = GATConv(9, 3, heads=2).double().eval()
    x = torch.randn(n, 9, dtype=torch.float64) * (torch.rand(n, 9) < 0.3)  # mostly zeros
    assert (x == 0).any() and (x != 0).any()
    dense = layer(x, edge_index)
    dense.sum().backward()
    g_dense = layer.lin.weight.grad.clone()
    layer.zero_grad()
    sparse = layer(x.to_sparse(), edge_index)
    sparse.sum().backward()
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(layer.lin.weight.grad, g_dense)
    with pytest.raises(TypeError, match="layout"):
        layer(x.to_sparse_csr(), edge_index)
