"""attnkit.functional.attention vs independent references: the float64 oracle (tests/reference.py),
``F.scaled_dot_product_attention`` and ``torch.nn.MultiheadAttention``.

Proves: every mask kind (dense, causal and window with L != S both ways, padding (B,) and (B, L), graph, & and |)
gives the oracle's output and weights on every backend; float32 agrees with SDPA and with torch's MHA (its
True = IGNORE masks converted) to 1e-5 on masks holding both True and False; backends "sdpa" and "math" agree;
``out == weights @ v``; grouped-query equals repeated K/V heads (and SDPA's ``enable_gqa``); dropout is seeded
and drops a fraction p; broadcast and non-contiguous inputs; empty queries/keys; non-finite values in masked-out
keys/values do not leak.
"""

import pytest
import torch
import torch.nn.functional as F

from attnkit import masks
from attnkit.functional import attention
from reference import (
    assert_mixed,
    attention_ref,
    causal_ref,
    graph_ref,
    padding_ref,
    random_mask,
    repeat_kv_heads,
    window_ref,
)

F64 = torch.float64
BACKENDS = ["auto", "math", "sdpa"]


def _qkv(gen, B=2, H=3, L=5, S=7, D=4, Dv=6, Hkv=None, dtype=F64):
    q = torch.randn(B, H, L, D, generator=gen, dtype=dtype)
    k = torch.randn(B, Hkv or H, S, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv or H, S, Dv, generator=gen, dtype=dtype)
    return q, k, v


def _mask_case(name, gen, L, S, B=2):
    """(attnkit mask, dense oracle mask broadcastable to (B, H, L, S)) built independently."""
    if name == "none":
        return None, None
    if name == "full":
        return masks.full(), None
    if name == "dense":
        m = random_mask((L, S), gen)
        return m, m
    if name == "dense_batched":
        m = random_mask((B, 1, L, S), gen)
        return m, m
    if name == "causal":
        return masks.causal(), causal_ref(L, S)
    if name == "window":
        return masks.window(1, 2), window_ref(L, S, 1, 2)
    if name == "window_left_none":
        return masks.window(None, 1), window_ref(L, S, None, 1)
    if name == "padding":
        lengths = torch.tensor([max(S - 2, 1), 1])
        return masks.padding(lengths), padding_ref(lengths, L, S)[:, None]
    if name == "padding_per_query":
        lengths = torch.randint(0, S + 1, (B, L), generator=gen)
        return masks.padding(lengths), padding_ref(lengths, L, S)[:, None]
    if name == "causal&padding":
        lengths = torch.tensor([S, 2])
        return masks.causal() & masks.padding(lengths), causal_ref(L, S) & padding_ref(lengths, L, S)[:, None]
    if name == "window|dense":
        m = random_mask((L, S), gen, p=0.2)
        return masks.window(0, 0) | m, window_ref(L, S, 0, 0) | m
    raise AssertionError(name)


MASKS = ["none", "full", "dense", "dense_batched", "causal", "window", "window_left_none", "padding",
         "padding_per_query", "causal&padding", "window|dense"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("L,S", [(5, 7), (7, 5), (6, 6)])
def test_matches_oracle_float64(gen, backend, name, L, S):
    q, k, v = _qkv(gen, L=L, S=S)
    mask, dense = _mask_case(name, gen, L, S)
    if dense is not None:
        assert_mixed(dense)
    out, w = attention(q, k, v, mask=mask, return_weights=True, backend=backend)
    ref_out, ref_w = attention_ref(q, k, v, mask=dense)
    assert out.shape == (2, 3, L, 6) and w.shape == (2, 3, L, S)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_mask_matches_oracle(gen, backend):
    N = 6
    # a ring, one extra edge 5 -> 3, a self loop at 2 and a duplicate 0 -> 1; node 0 also gets 5 -> 0
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5, 5, 2, 0], [1, 2, 3, 4, 5, 0, 3, 2, 1]])
    q, k, v = _qkv(gen, L=N, S=N)
    out, w = attention(q, k, v, mask=masks.graph(edge_index, num_nodes=N), return_weights=True, backend=backend)
    ref_out, ref_w = attention_ref(q, k, v, mask=graph_ref(edge_index, N))
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_matches_oracle(gen, backend):
    q, k, v = _qkv(gen, L=5, S=7)
    bias = torch.randn(3, 5, 7, generator=gen, dtype=F64)  # per head, like ALiBi
    mask = random_mask((2, 1, 5, 7), gen)
    out = attention(q, k, v, mask=mask, bias=bias, scale=0.3, backend=backend)
    torch.testing.assert_close(out, attention_ref(q, k, v, mask=mask, bias=bias, scale=0.3)[0])


# ---- float32 vs PyTorch's own implementations ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_vs_torch_sdpa_float32(gen, backend, with_bias, scale):
    q, k, v = _qkv(gen, L=9, S=13, D=8, Dv=8, dtype=torch.float32)
    mask = random_mask((2, 3, 9, 13), gen)
    mask[..., 0] = True  # every row keeps a key (SDPA's own result for empty rows is not the point here)
    assert_mixed(mask)
    bias = torch.randn(1, 3, 9, 13, generator=gen) if with_bias else None
    out = attention(q, k, v, mask=mask, bias=bias, scale=scale, backend=backend)
    sdpa_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=scale)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vs_torch_sdpa_causal_and_gqa(gen, backend):
    q, k, v = _qkv(gen, H=4, Hkv=2, L=11, S=11, D=8, Dv=8, dtype=torch.float32)
    out = attention(q, k, v, mask=masks.causal(), backend=backend)
    expect = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vs_torch_multihead_attention(gen, backend):
    """torch MHA's True = IGNORE masks are converted: key_padding_mask = ~valid, attn_mask = ~allowed."""
    torch.manual_seed(0)
    E, H, B, L, S = 12, 3, 2, 5, 7
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
    x_q = torch.randn(B, L, E, generator=gen)
    x_kv = torch.randn(B, S, E, generator=gen)
    lengths = torch.tensor([S, 4])
    allowed = random_mask((L, S), gen, p=0.7)
    allowed[:, 0] = True
    assert_mixed(allowed)
    valid = padding_ref(lengths, L, S)[:, 0, :]  # (B, S) True = real key
    with torch.no_grad():
        expect, expect_w = mha(x_q, x_kv, x_kv, key_padding_mask=~valid, attn_mask=~allowed, need_weights=True,
                               average_attn_weights=False)
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

        def heads(x, w, b):
            return (x @ w.T + b).view(B, -1, H, E // H).transpose(1, 2)  # (B, H, T, D)

        q, k, v = heads(x_q, w_q, b_q), heads(x_kv, w_k, b_k), heads(x_kv, w_v, b_v)
        out, w = attention(q, k, v, mask=masks.padding(lengths) & allowed, return_weights=True, backend=backend)
        out = out.transpose(1, 2).reshape(B, L, E) @ mha.out_proj.weight.T + mha.out_proj.bias  # (B, L, E)
    torch.testing.assert_close(w, expect_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("L,S", [(1, 17), (17, 1), (8, 13)])
def test_sdpa_and_math_backends_agree(gen, name, L, S):
    q, k, v = _qkv(gen, L=L, S=S, D=5, Dv=3, dtype=torch.float32)
    mask, _ = _mask_case(name, gen, L, S)
    out_s, w_s = attention(q, k, v, mask=mask, backend="sdpa", return_weights=True)
    out_m, w_m = attention(q, k, v, mask=mask, backend="math", return_weights=True)
    torch.testing.assert_close(out_s, out_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_s, w_m, rtol=1e-5, atol=1e-5)
    # the returned weights are the ones that multiplied v
    torch.testing.assert_close(out_s, w_s @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_m, w_m @ v, rtol=1e-6, atol=1e-6)


# ---- grouped-query -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hkv", [1, 2, 6])
def test_gqa_equals_repeated_heads(gen, backend, hkv):
    q, k, v = _qkv(gen, H=6, Hkv=hkv, L=4, S=9)
    mask = random_mask((2, 1, 4, 9), gen)
    out, w = attention(q, k, v, mask=mask, backend=backend, return_weights=True)
    k_rep, v_rep = repeat_kv_heads(k, 6), repeat_kv_heads(v, 6)  # head h reads kv head h // (6 // hkv)
    out_rep, w_rep = attention(q, k_rep, v_rep, mask=mask, backend=backend, return_weights=True)
    torch.testing.assert_close(out, out_rep, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, w_rep, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, attention_ref(q, k, v, mask=mask)[0])


# ---- dropout -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_seed_same_output(gen, backend):
    q, k, v = _qkv(gen, dtype=torch.float32)
    torch.manual_seed(7)
    a = attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(7)
    b = attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(8)
    c = attention(q, k, v, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, attention(q, k, v, backend=backend))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate_and_rescale_with_weights(gen, p):
    q, k, v = _qkv(gen, B=4, H=4, L=64, S=64, D=8, Dv=8, dtype=torch.float32)
    clean = attention(q, k, v, backend="math", return_weights=True)[1]
    torch.manual_seed(3)
    out, w = attention(q, k, v, dropout_p=p, return_weights=True, backend="math")
    dropped = w == 0
    rate = dropped.double().mean().item()  # all clean weights are > 0 (softmax), so zeros are drops
    assert bool((clean > 0).all())
    assert abs(rate - p) < 0.01, rate
    # kept weights are rescaled by 1 / (1 - p); the output is exactly what those weights make
    torch.testing.assert_close(w[~dropped], clean[~dropped] / (1 - p))
    torch.testing.assert_close(out, w @ v, rtol=1e-6, atol=1e-6)


def test_dropout_with_weights_on_sdpa_is_refused(gen):
    q, k, v = _qkv(gen, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this request.*weights"):
        attention(q, k, v, dropout_p=0.1, return_weights=True, backend="sdpa")
    out, w = attention(q, k, v, dropout_p=0.1, return_weights=True)  # auto picks a backend that can
    torch.testing.assert_close(out, w @ v, rtol=1e-6, atol=1e-6)


# ---- layouts, broadcasting, edge sizes -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_and_three_dim_inputs(gen, backend):
    q, k, v = (torch.randn(n, 4, generator=gen, dtype=F64) for n in (5, 7, 7))
    m = random_mask((5, 7), gen)
    torch.testing.assert_close(attention(q, k, v, mask=m, backend=backend), attention_ref(q, k, v, mask=m)[0])
    q3, k3, v3 = (torch.randn(2, n, 4, generator=gen, dtype=F64) for n in (5, 7, 7))
    lengths = torch.tensor([3, 7])
    per_query = torch.randint(0, 8, (2, 5), generator=gen)
    cases = [
        (masks.padding(lengths), padding_ref(lengths, 5, 7)),  # (B, L, S) masks align with the batch dim
        (masks.padding(lengths) & masks.causal(), padding_ref(lengths, 5, 7) & causal_ref(5, 7)),
        (masks.padding(per_query) | masks.window(0, 0), padding_ref(per_query, 5, 7) | window_ref(5, 7, 0, 0)),
    ]
    for mask, dense in cases:
        out, w = attention(q3, k3, v3, mask=mask, backend=backend, return_weights=True)
        ref_out, ref_w = attention_ref(q3, k3, v3, mask=dense)
        assert out.shape == (2, 5, 4) and w.shape == (2, 5, 7)
        torch.testing.assert_close(w, ref_w)
        torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 1, 7), (1, 3, 5, 1), (1, 1, 5, 7), (2, 3, 5, 7), (5, 7), (7,)])
def test_mask_broadcast_and_expanded_masks(gen, backend, shape):
    q, k, v = _qkv(gen, L=5, S=7)
    m = random_mask(shape, gen)
    if m.shape[-1] == 1:
        m[0, 0, 0, 0] = True  # (1, 3, 5, 1): some rows fully masked, others open
        assert_mixed(m)
    expanded = m.expand(2, 3, 5, 7)  # stride-0 view
    ref = attention_ref(q, k, v, mask=m)[0]
    torch.testing.assert_close(attention(q, k, v, mask=m, backend=backend), ref)
    torch.testing.assert_close(attention(q, k, v, mask=expanded, backend=backend), ref)
    torch.testing.assert_close(attention(q, k, v, mask=expanded.contiguous(), backend=backend), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(gen, backend):
    packed = torch.randn(2, 7, 3 * 3 * 4, generator=gen, dtype=F64)  # (B, T, 3 * H * D)
    q, k, v = (t.view(2, 7, 3, 4).transpose(1, 2) for t in packed.chunk(3, dim=-1))  # (B, H, T, D) views
    assert not q.is_contiguous()
    m = random_mask((7, 7), gen)
    ref = attention_ref(q, k, v, mask=m)[0]
    torch.testing.assert_close(attention(q, k, v, mask=m, backend=backend), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [
    "none", "causal", "window", "padding",
    "padding_per_query",
    "graph",
])
def test_empty_queries(gen, backend, kind):
    S = 0 if kind == "graph" else 5  # a graph of 0 nodes has no keys either
    q, k, v = _qkv(gen, L=0, S=S)
    mask = {
        "none": None, "causal": masks.causal(), "window": masks.window(1, 1),
        "padding": masks.padding(torch.tensor([2, 5])),
        "padding_per_query": masks.padding(torch.zeros(2, 0, dtype=torch.long)),  # (B, L) with L = 0
        "graph": masks.graph(torch.zeros(2, 0, dtype=torch.long), num_nodes=0),
    }[kind]
    out, w = attention(q, k, v, mask=mask, backend=backend, return_weights=True)
    assert out.shape == (2, 3, 0, 6) and w.shape == (2, 3, 0, S)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_keys_give_zero_output_and_zero_dq(gen, backend):
    q, k, v = _qkv(gen, L=4, S=0)
    q.requires_grad_()
    out = attention(q, k, v, backend=backend)
    assert out.shape == (2, 3, 4, 6) and bool((out == 0).all())
    out.sum().backward()
    assert bool((q.grad == 0).all())


def _mask_hiding_key_3(kind, gen):
    """(mask, L, S): key 3 is one no query may attend; every query keeps at least one key."""
    if kind == "dense":
        m = random_mask((5, 7), gen)
        m[:, 3] = False
        m[:, 0] = True
        assert_mixed(m)
        return m, 5, 7
    if kind == "padding":
        return masks.padding(torch.tensor([3, 2])), 5, 7
    if kind == "window":  # L=2, S=7, bottom-right: query 0 sees keys 4, 5 and query 1 keys 5, 6
        return masks.window(1, 0), 2, 7
    if kind == "graph":  # edges j -> i; node 3 is the source of no edge
        return masks.graph(torch.tensor([[0, 1, 2, 4, 5, 6, 0], [1, 2, 3, 5, 6, 0, 4]]), num_nodes=7), 7, 7
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", "padding", "window", "graph"])
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_masked_out_keys_values_do_not_leak(gen, backend, kind, where, bad):
    """A key no query may attend (padding, outside every window, no out-edge) holding NaN/inf changes nothing."""
    mask, L, S = _mask_hiding_key_3(kind, gen)
    q, k, v = _qkv(gen, L=L, S=S, dtype=torch.float32)
    clean = attention(q, k, v, mask=mask, backend=backend)
    k2, v2 = k.clone(), v.clone()
    (k2 if where == "key" else v2)[..., 3, :] = bad
    dirty = attention(q, k2, v2, mask=mask, backend=backend)
    assert bool(dirty.isfinite().all()), f"{bad} in masked-out {where} 3 leaked into the output ({kind} mask)"
    torch.testing.assert_close(dirty, clean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_gradcheck_with_bias_and_an_empty_row(gen, backend):
    from torch.autograd import gradcheck

    q, k, v = (torch.randn(2, n, d, generator=gen, dtype=F64) for n, d in ((3, 4), (5, 4), (5, 3)))
    bias = torch.randn(3, 5, generator=gen, dtype=F64)
    mask = random_mask((2, 3, 5), gen, p=0.6)
    mask[..., 0] = True
    mask[1, 2] = False  # one query with nothing to attend: its gradient must be exactly zero, not NaN
    assert_mixed(mask)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))
    assert gradcheck(lambda q, k, v, b: attention(q, k, v, mask=mask, bias=b, backend=backend), inputs)
    out = attention(*inputs[:3], mask=mask, bias=inputs[3], backend=backend)
    torch.testing.assert_close(out, attention_ref(q, k, v, mask=mask, bias=bias)[0])


@pytest.mark.parametrize("mask_kind", ["causal&key_mask", "window", "padding&causal", "dense_sparse"])
def test_auto_at_sizes_where_fast_kernels_take_over(gen, mask_kind):
    """backend='auto' on 600 x 600 problems (where structured masks leave the plain path) equals backend='math'."""
    L = S = 600
    q, k, v = _qkv(gen, B=1, H=2, L=L, S=S, D=8, Dv=4, dtype=torch.float32)
    key_mask = torch.arange(S) < 100  # (S,): a key mask, as users write it
    mask = {
        "causal&key_mask": masks.causal() & key_mask,
        "window": masks.window(8, 0),
        "padding&causal": masks.padding(torch.tensor([90])) & masks.causal(),
        "dense_sparse": random_mask((1, 1, L, S), gen, p=0.002),
    }[mask_kind]
    out = attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, attention(q, k, v, mask=mask, backend="math"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_gradcheck_non_contiguous_packed_qkv(gen, backend):
    """q, k, v as strided views of one packed (B, T, 3 * H * D) tensor, transposed to (B, H, T, D)."""
    from torch.autograd import gradcheck

    packed = torch.randn(2, 4, 3 * 2 * 3, generator=gen, dtype=F64).requires_grad_()
    mask = random_mask((4, 4), gen, p=0.6)
    mask[:, 0] = True
    assert_mixed(mask)

    def fn(packed):
        q, k, v = (t.view(2, 4, 2, 3).transpose(1, 2) for t in packed.chunk(3, dim=-1))  # (B, H, T, D) views
        assert not q.is_contiguous()
        return attention(q, k, v, mask=mask, backend=backend)

    assert gradcheck(fn, (packed,))


def test_unused_keys_remembered_on_a_dense_mask_follow_in_place_edits():
    # the keys no query may see are remembered on the mask; an in-place edit must not reuse the old answer,
    # or NaN sitting in a newly unused key would leak (0 * NaN)
    from attnkit import masks
    from attnkit.functional import attention

    allowed = torch.ones(4, 6, dtype=torch.bool)
    allowed[:, 3] = False
    m = masks.dense(allowed)
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (4, 6, 6))
    for bad in (3, 5):
        if bad == 5:
            allowed[:, 3], allowed[:, 5] = True, False  # in place: key 3 is used now, key 5 is not
        k2, v2 = k.clone(), v.clone()
        k2[..., bad, :], v2[..., bad, :] = float("nan"), float("nan")
        out = attention(q, k2, v2, mask=m, backend="math")
        keep = torch.tensor([j != bad for j in range(6)])
        ref = attention(q, k[..., keep, :], v[..., keep, :], backend="math")
        torch.testing.assert_close(out, ref)
