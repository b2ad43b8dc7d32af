"""The bench's anchors compute the same function as the attnkit case they are compared with."""

import functools

import pytest
import torch

from attnkit import masks
from attnkit.bench import anchors, cases
from attnkit.functional import scores
from attnkit.functional.attention import attention


def test_cora_sized_graph_is_undirected_simple_and_exact_size():
    ei = cases.cora_sized_graph(300, 1200, seed=1)
    assert ei.shape == (2, 1200)
    assert (ei[0] != ei[1]).all()  # no self loops
    keys = ei[0] * 300 + ei[1]
    assert keys.unique().numel() == 1200  # no duplicate edges
    assert set(keys.tolist()) == set((ei[1] * 300 + ei[0]).tolist())  # every edge both ways
    assert torch.equal(ei, cases.cora_sized_graph(300, 1200, seed=1))  # seeded


def test_local_attention_anchor_is_the_same_window():
    pytest.importorskip("local_attention")
    w, L = 8, 48  # a multiple of w (its autopad lets the last rows see zero padding keys)
    make = anchors.local_attention_factory(1, 2, L, 4, w, "fwd")
    run = make()
    out = run()
    q, k, v = anchors._qkv(1, 2, L, L, 4, grad=False)
    ref = attention(q, k, v, mask=masks.window(w, w), backend="math")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_broadcast_additive_anchor_equals_attnkit_math():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, generator=g) for n in (7, 9, 9))
    w_q, w_k, w_v = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    with torch.no_grad():
        out = anchors.additive_broadcast(q, k, v, w_q, w_k, w_v)
    add = functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)
    torch.testing.assert_close(out, attention(q, k, v, score=add, backend="math"), rtol=1e-5, atol=1e-6)


def test_missing_package_is_reported_not_raised_as_import_error():
    with pytest.raises(anchors.AnchorUnavailable, match="not installed"):
        anchors._require("attnkit_no_such_module", "no-such-package")


def test_every_case_has_issue_settings_and_roles():
    built = {c.role: c for c in cases.build_cases(False, flex=False) if c.role}
    assert set(built) >= {"dense", "causal", "window_fwd", "window_fwdbwd", "window_fwdbwd_long", "blocksparse",
                          "additive", "graph", "linear", "linear_step"}
    assert built["window_fwd"].L == 16384 and built["window_fwdbwd_long"].L == 65536
    assert "local_attention" in built["window_fwd"].impls and "sdpa" in built["window_fwdbwd"].impls
    assert built["additive"].id == "additive-h128-L2048-B4-fwd"
    assert built["blocksparse"].L == 8192 and "sdpa_nomask" in built["blocksparse"].impls
    assert built["graph"].id == "graph-N2708-E10556-fwd+bwd" and "gatconv" in built["graph"].impls
    assert built["linear"].L == 16384


def test_flex_mask_mod_is_the_same_window():
    """Checked with FlexAttention's eager path (the bench compiles it; compiling here would take minutes)."""
    import warnings

    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    w, L = 8, 256
    block_mask = flex.create_block_mask(anchors.window_mask_mod(w), None, None, L, L, device="cpu")
    q, k, v = anchors._qkv(1, 2, L, L, 16, grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        out = flex.flex_attention(q, k, v, block_mask=block_mask)
    ref = attention(q, k, v, mask=masks.window(w, w), backend="math")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
