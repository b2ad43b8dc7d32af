"""attnkit.masks vs the oracle's dense builders (tests/reference.py), written independently of masks.py.

Proves: every constructor materializes to the oracle's boolean tensor (causal and window bottom-right aligned,
windows 0 and 1 and left=None, L != S both ways, padding from (B,) and (B, L) lengths, graph from edge_index with
query = target, graph from the equivalent adjacency, dense, full); & and | are elementwise and/or; batched masks
get the requested leading dims; ``block_mask`` equals the tile-wise any() of the dense mask exactly (a superset
only for And); bad arguments raise ValueError/TypeError naming the argument.
"""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit import masks
from reference import causal_ref, full_ref, graph_ref, padding_ref, random_mask, tile_any_ref, window_ref

SIZES = [(1, 1), (1, 5), (5, 1), (4, 9), (9, 4), (7, 7), (17, 2)]
WIDTHS = [0, 1, 3, None]


@pytest.mark.parametrize("L,S", SIZES)
def test_full_and_causal(L, S):
    assert torch.equal(masks.full().materialize(L, S), full_ref(L, S))
    assert torch.equal(masks.causal().materialize(L, S), causal_ref(L, S))
    if L > S:  # the first L - S queries see nothing (bottom-right rule)
        assert not bool(masks.causal().materialize(L, S)[: L - S].any())


def test_causal_hand_example():
    # L=2, S=4: the last query sees all four keys, the first one three of them
    expect = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(masks.causal().materialize(2, 4), expect)
    assert torch.equal(causal_ref(2, 4), expect)


@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("left,right", list(itertools.product(WIDTHS, WIDTHS)))
def test_window(L, S, left, right):
    m = masks.window(left, right).materialize(L, S)
    assert m.dtype == torch.bool and m.shape == (L, S)
    assert torch.equal(m, window_ref(L, S, left, right))


def test_window_widths_are_inclusive():
    m = masks.window(2, 0).materialize(10, 10)
    assert m.sum(-1).tolist() == [1, 2] + [3] * 8  # (left=w, right=0) sees w + 1 keys
    assert torch.equal(masks.window(None, 0).materialize(6, 9), causal_ref(6, 9))


@pytest.mark.parametrize("L,S", [(4, 6), (6, 4), (1, 1)])
def test_padding_per_sequence_and_per_query(gen, L, S):
    lengths = torch.tensor([0, 1, S, S + 3])  # zero, one, all, beyond S
    for as_given in (lengths, lengths.tolist()):
        m = masks.padding(as_given).materialize(L, S)
        assert m.shape == (4, L, S)
        assert torch.equal(m, padding_ref(lengths, L, S))
    per_query = torch.randint(0, S + 1, (3, L), generator=gen)
    m = masks.padding(per_query).materialize(L, S, batch_ndim=2)
    assert m.shape == (3, 1, L, S)
    assert torch.equal(m[:, 0], padding_ref(per_query, L, S))


def test_graph_from_edge_index_and_adjacency(gen):
    N = 7
    edge_index = torch.randint(0, N, (2, 15), generator=gen)
    ref = graph_ref(edge_index, N)
    assert bool(ref.any()) and not bool(ref.all())
    g = masks.graph(edge_index, num_nodes=N)
    assert torch.equal(g.materialize(N, N), ref)
    # the same graph given as adjacency[i, j] = "query i sees key j"
    from_adj = masks.graph(adjacency=ref)
    assert torch.equal(from_adj.materialize(N, N), ref)
    assert torch.equal(from_adj.block_mask(N, N, 3), g.block_mask(N, N, 3))
    loops = masks.graph(edge_index, num_nodes=N, add_self_loops=True).materialize(N, N)
    assert torch.equal(loops, ref | torch.eye(N, dtype=torch.bool))


def test_graph_direction_is_source_to_target():
    # one edge 0 -> 2: query (target) 2 attends to key (source) 0, nothing else
    m = masks.graph(torch.tensor([[0], [2]]), num_nodes=3).materialize(3, 3)
    assert m.nonzero().tolist() == [[2, 0]]


@pytest.mark.parametrize("L,S", [(5, 8), (8, 5)])
def test_and_or_dense(gen, L, S):
    d = random_mask((L, S), gen)
    lengths = torch.tensor([2, S])
    pad = padding_ref(lengths, L, S)
    cases = [
        (masks.causal() & masks.window(1, None), causal_ref(L, S) & window_ref(L, S, 1, None)),
        (masks.causal() | masks.window(0, 2), causal_ref(L, S) | window_ref(L, S, 0, 2)),
        (masks.window(1, 1) & d, window_ref(L, S, 1, 1) & d),
        (d | masks.window(0, 0), d | window_ref(L, S, 0, 0)),
        (masks.causal() & masks.padding(lengths), causal_ref(L, S) & pad),
        (masks.padding(lengths) | masks.window(0, 0), pad | window_ref(L, S, 0, 0)),
        (masks.dense(d), d),
    ]
    for mask, ref in cases:
        got = mask.materialize(L, S)
        assert torch.equal(got, ref.expand(got.shape)) and got.shape == ref.shape, mask
        assert torch.equal(masks.materialize(mask, L, S), got)


# ---- block_mask: which tiles hold anything -----------------------------------------------------------------


def _exact_cases(gen, L, S):
    d = random_mask((L, S), gen, p=0.1)
    lengths = torch.tensor([1, max(S // 3, 1)])
    yield masks.full()
    yield masks.causal()
    for left, right in [(0, 0), (1, 0), (0, 1), (2, 3), (None, 1), (3, None)]:
        yield masks.window(left, right)
    yield masks.padding(lengths)
    yield masks.dense(d)
    yield masks.causal() | masks.window(0, 2)
    yield masks.padding(lengths) | d
    yield masks.window(0, 0) | masks.dense(d)
    if L == S:
        yield masks.graph(torch.randint(0, L, (2, L), generator=gen), num_nodes=L)


@pytest.mark.parametrize("L,S", [(1, 1), (13, 13), (9, 20), (20, 9), (16, 16)])
@pytest.mark.parametrize("block", [1, 3, 4, (2, 5), 128])
def test_block_mask_is_tilewise_any(gen, L, S, block):
    bq, bk = (block, block) if isinstance(block, int) else block
    for mask in _exact_cases(gen, L, S):
        expect = tile_any_ref(mask.materialize(L, S), bq, bk)
        got = mask.block_mask(L, S, block)
        assert got.dtype == torch.bool and torch.equal(got, expect), (mask, block)


@pytest.mark.parametrize("L,S", [(13, 13), (9, 20), (20, 9)])
@pytest.mark.parametrize("block", [1, 3, (2, 5)])
def test_block_mask_per_query_padding_is_exact(gen, L, S, block):
    bq, bk = (block, block) if isinstance(block, int) else block
    lengths = torch.randint(0, S + 1, (2, L), generator=gen)
    lengths[:, 0] = S  # the first tile row is long, later ones may be short
    mask = masks.padding(lengths)
    assert torch.equal(mask.block_mask(L, S, block), tile_any_ref(mask.materialize(L, S), bq, bk))


@pytest.mark.parametrize("L,S", [(13, 13), (9, 20), (20, 9)])
def test_block_mask_of_and_is_a_superset(gen, L, S):
    d = random_mask((L, S), gen, p=0.2)
    for mask in (masks.causal() & masks.window(2, 0), masks.window(0, 0) & d,
                 masks.padding(torch.tensor([3, S])) & masks.causal()):
        got = mask.block_mask(L, S, 4)
        exact = tile_any_ref(mask.materialize(L, S), 4, 4)
        assert bool((got | ~exact).all()), mask  # every non-empty tile is reported


# ---- bad arguments -----------------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="left must be >= 0"):
        masks.window(-1, 0)
    with pytest.raises(ValueError, match="right must be >= 0"):
        masks.window(0, -2)
    with pytest.raises(TypeError, match="left must be an int"):
        masks.window(1.5, 0)
    with pytest.raises(TypeError, match="lengths must hold integers"):
        masks.padding(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="lengths must hold integers"):
        masks.padding([1.5, 2.0])
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        masks.padding([1, -1])
    with pytest.raises(ValueError, match=r"lengths must have 1 or 2 dimensions"):
        masks.padding(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"per-query lengths must have shape \(B, L\)"):
        masks.padding(torch.ones(2, 3, dtype=torch.long)).materialize(4, 5)
    with pytest.raises(ValueError, match="graph mask needs exactly one of edge_index"):
        masks.graph()
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        masks.graph(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="edge_index must hold integer node ids"):
        masks.graph(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="edge_index node ids must lie in"):
        masks.graph(torch.tensor([[0, 5], [1, 2]]), num_nodes=4)
    with pytest.raises(ValueError, match="adjacency must be square"):
        masks.graph(adjacency=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="graph mask has 4 nodes"):
        masks.graph(torch.tensor([[0], [1]]), num_nodes=4).materialize(4, 5)
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        masks.dense(torch.ones(3, 3))
    with pytest.raises(TypeError, match="mask must be an attnkit Mask or a boolean tensor"):
        masks.causal() & [[True]]
    with pytest.raises(ValueError, match="block must be >= 1"):
        masks.causal().block_mask(4, 4, 0)
    with pytest.raises(ValueError, match="does not broadcast"):
        masks.dense(torch.ones(3, 3, dtype=torch.bool)).materialize(4, 4)


# ---- property: block_mask on random sizes, blocks and widths ----------------------------------------------


@given(L=st.integers(1, 40), S=st.integers(1, 40), bq=st.integers(1, 9), bk=st.integers(1, 9),
       left=st.none() | st.integers(0, 6), right=st.none() | st.integers(0, 6), seed=st.integers(0, 2**31 - 1))
def test_block_mask_property(L, S, bq, bk, left, right, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, S + 1, (2,), generator=g)
    per_query = torch.randint(0, S + 1, (2, L), generator=g)
    d = random_mask((L, S), g, p=0.1, mixed=L * S >= 2)
    exact = [masks.window(left, right), masks.causal(), masks.padding(lengths), masks.padding(per_query),
             masks.dense(d), masks.window(left, right) | masks.padding(lengths), masks.causal() | d]
    if L == S:
        exact.append(masks.graph(torch.randint(0, L, (2, 2 * L), generator=g), num_nodes=L))
    for mask in exact:
        assert torch.equal(mask.block_mask(L, S, (bq, bk)), tile_any_ref(mask.materialize(L, S), bq, bk)), mask
    for mask in (masks.window(left, right) & masks.padding(per_query), masks.causal() & d):
        got = mask.block_mask(L, S, (bq, bk))
        assert bool((got | ~tile_any_ref(mask.materialize(L, S), bq, bk)).all()), mask


@pytest.mark.parametrize("shape", [(9,), (1, 9), (6, 1), (2, 1, 6, 9), (1, 1, 1, 9)])
def test_block_mask_of_broadcast_dense_masks(gen, shape):
    """A dense mask only broadcastable to (L, S) (key mask (S,) or (1, S), query mask (L, 1), batched)."""
    L, S = 6, 9
    d = random_mask(shape, gen, p=0.3)
    full_d = d.expand(*d.shape[:-2], L, S) if d.ndim >= 2 else d.expand(L, S)
    for mask, dense in ((masks.dense(d), full_d), (masks.causal() & d, causal_ref(L, S) & full_d),
                        (masks.causal() | d, causal_ref(L, S) | full_d)):
        got = mask.block_mask(L, S, (2, 4))
        expect = tile_any_ref(dense, 2, 4)
        if isinstance(mask, masks.And):
            assert bool((got | ~expect).all()), mask
        else:
            assert torch.equal(got, expect), mask
