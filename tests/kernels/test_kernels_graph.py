"""Edge-list attention vs the float64 loop reference and vs dense masked softmax attention."""

import pytest
import torch
from _kernel_ref import edge_attention_ref, masked_softmax_attention_ref

from attnkit.kernels.graph import edge_aggregate, edge_softmax, graph_attention


def _graph(N=9, E=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, N, (E,), generator=g)
    dst = torch.randint(0, N - 2, (E,), generator=g)  # nodes N-2, N-1 have no in-edge
    ei = torch.stack([src, dst])
    assert not (dst == N - 1).any()
    return ei


def _to(device, *ts):
    """The CPU-built inputs (edge lists included) on ``device``; references keep computing on the CPU originals."""
    return tuple(t.to(device) for t in ts)


def _close(a, ref, **tol):
    torch.testing.assert_close(a.cpu().double(), ref, **tol)


def test_edge_softmax_and_aggregate_match_reference(device):
    N, H, D = 9, 3, 4
    ei = _graph(N)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(ei.shape[1], H, generator=g) * 3
    v = torch.randn(N, H, D, generator=g)
    ds, dv, dei = _to(device, s, v, ei)
    w = edge_softmax(ds, dei[1], N)
    out = edge_aggregate(w, dv, dei, N)
    w_ref, out_ref = edge_attention_ref(s, v, ei, N)
    _close(w, w_ref, rtol=1e-5, atol=1e-6)
    _close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert out[N - 1].abs().max().item() == 0 and out[N - 2].abs().max().item() == 0


def test_graph_attention_equals_dense_masked_softmax(device):
    N, H, D = 11, 2, 5
    ei = _graph(N, E=40, seed=2)
    ei = torch.unique(ei, dim=1)  # dense masks cannot express duplicate edges
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(N, H, D, generator=g) for _ in range(3))
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[ei[1], ei[0]] = True
    assert mask.any() and not mask.all()
    out, w = graph_attention(*_to(device, q, k, v, ei), return_weights=True)
    ref_out, ref_w = masked_softmax_attention_ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)
    _close(out, ref_out.transpose(0, 1), rtol=1e-5, atol=1e-6)
    _close(w, ref_w[:, ei[1], ei[0]].T, rtol=1e-5, atol=1e-6)


def test_gradcheck_all_parts(device):
    N, H, D = 6, 2, 3
    ei = _graph(N, E=14, seed=4).to(device)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(N, H, D, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
               for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: graph_attention(a, b, c, ei), (q, k, v))
    s = torch.randn(14, H, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: edge_softmax(x, ei[1], N), (s,))
    w = torch.rand(14, H, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: edge_aggregate(a, b, ei, N), (w, v))


def test_all_minus_inf_scores_give_zero_weights_and_finite_grads(device):
    ei = torch.tensor([[0, 1, 2], [1, 1, 0]], device=device)
    s = torch.tensor([[float("-inf")], [float("-inf")], [0.5]], device=device, requires_grad=True)
    w = edge_softmax(s, ei[1], 3)
    assert torch.equal(w.detach().cpu(), torch.tensor([[0.0], [0.0], [1.0]]))
    w.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_no_edges(device):
    q = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)
    out = graph_attention(q, q, q, torch.zeros(2, 0, dtype=torch.long, device=device))
    assert out.shape == (4, 2, 3) and out.abs().max().item() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bad_input(device):
    q = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0)).to(device)
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        graph_attention(q, q, q, torch.zeros(3, 5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="num_nodes"):
        graph_attention(q, q, q, torch.tensor([[0, 9], [1, 2]], device=device))
    with pytest.raises(TypeError, match="integer"):
        edge_softmax(torch.randn(2, 1, device=device), torch.tensor([0.0, 1.0], device=device), 2)


def _dense_ref(q, k, v, ei):
    """Float64 reference through a dense (N, Nsrc) mask (edges must be unique)."""
    mask = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    mask[ei[1], ei[0]] = True
    out, w = masked_softmax_attention_ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)
    return out.transpose(0, 1), w[:, ei[1], ei[0]].T  # (N, H, Dv), (E, H)


def test_unsorted_edges_keep_the_callers_order_and_match_sorted(device):
    N, H, D = 12, 3, 4
    ei = torch.unique(_graph(N, E=50, seed=6), dim=1)
    shuffled = ei[:, torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(7))]
    assert not bool((shuffled[1, 1:] >= shuffled[1, :-1]).all())  # really unsorted
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(N, H, D, generator=g) for _ in range(3))
    dq, dk, dv = _to(device, q, k, v)
    out, w = graph_attention(dq, dk, dv, shuffled.to(device), return_weights=True)
    ref_out, ref_w = _dense_ref(q, k, v, shuffled)
    _close(out, ref_out, rtol=1e-5, atol=1e-6)
    _close(w, ref_w, rtol=1e-5, atol=1e-6)  # aligned with the shuffled edges
    out_s = graph_attention(dq, dk, dv, ei.to(device))
    torch.testing.assert_close(out_s, out, rtol=1e-6, atol=1e-6)


def test_gradcheck_through_weights_and_unsorted_edges(device):
    N, H, D = 6, 2, 3
    ei = _graph(N, E=14, seed=9)
    ei = ei[:, torch.randperm(14, generator=torch.Generator().manual_seed(1))].to(device)
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(N, H, D, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
               for _ in range(3))
    c = torch.randn(14, H, generator=g, dtype=torch.float64).to(device)

    def fn(a, b, x):
        out, w = graph_attention(a, b, x, ei, return_weights=True)
        return out.sum(-1) * 0.5, (w * c).sum(0)  # the weights carry gradients of their own

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_more_sources_than_destinations(device):
    N, Ns, H, D = 5, 9, 2, 3
    g = torch.Generator().manual_seed(11)
    ei = torch.unique(torch.stack([torch.randint(0, Ns, (20,), generator=g), torch.randint(0, N - 1, (20,),
                                                                                           generator=g)]), dim=1)
    q = torch.randn(N, H, D, generator=g)
    k, v = torch.randn(Ns, H, D, generator=g), torch.randn(Ns, H, D, generator=g)
    dq, dk, dv = _to(device, q, k, v)
    out = graph_attention(dq, dk, dv, ei.to(device))
    _close(out, _dense_ref(q, k, v, ei)[0], rtol=1e-5, atol=1e-6)
    assert out[N - 1].abs().max().item() == 0  # no in-edge
    with pytest.raises(ValueError, match="edge_index"):
        graph_attention(dq, dk, dv, torch.tensor([[9], [0]], device=device))  # source 9 is not a key node


def test_cached_structure_sees_in_place_edits(device):
    N, H, D = 10, 2, 4
    ei = torch.unique(_graph(N, E=30, seed=12), dim=1)
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(N, H, D, generator=g) for _ in range(3))
    dq, dk, dv, dei = _to(device, q, k, v, ei)
    graph_attention(dq, dk, dv, dei)  # builds (and remembers) the sorted structure
    dei[0] = (dei[0] + 1) % N  # same tensor, new sources: the structure must be rebuilt
    ei = dei.cpu()
    _close(graph_attention(dq, dk, dv, dei), _dense_ref(q, k, v, ei)[0], rtol=1e-5, atol=1e-6)


def test_isolated_nodes_zero_and_finite_grads_in_low_precision(device):
    N, H, D = 8, 2, 4
    ei = _graph(N, E=20, seed=14).to(device)  # nodes 6 and 7 have no in-edge
    g = torch.Generator().manual_seed(15)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(N, H, D, generator=g).mul(30).to(device, dtype).requires_grad_(True) for _ in range(3))
        out = graph_attention(q, k, v, ei)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert out[N - 2 :].abs().max().item() == 0
        out.float().sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
        assert q.grad[N - 2 :].abs().max().item() == 0  # an isolated query gets no gradient
