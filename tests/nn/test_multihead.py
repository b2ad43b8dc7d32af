"""MultiHeadAttention against torch.nn.MultiheadAttention (via from_torch / to_torch) and a float64 reference.

The reference below writes multi-head attention out head by head in float64 from the module's weights:
    head_h = softmax(Q_h K_g^T / sqrt(D) + bias, masked) V_g,   g = h // (H / G)
    out = concat(head_h) W_o^T + b_o
with a query row that may attend to nothing giving zero weights. Nothing in it comes from attnkit.
"""

import math

import pytest
import torch

from attnkit import masks
from attnkit.nn.multihead import MultiHeadAttention

ATOL = 1e-5


def ref_mha(m, query, key, value, mask=None, bias=None, q_pos=None, k_pos=None):
    """Plain float64 multi-head attention from ``m``'s weights; ``mask`` bool (., ., L, S) True = attend."""
    H, G = m.num_heads, m.num_kv_heads
    D = m.embed_dim // H

    def lin(p, x):
        y = x.double() @ p.weight.detach().double().T
        return y + p.bias.detach().double() if p.bias is not None else y

    Q, K, V = lin(m.q_proj, query), lin(m.k_proj, key), lin(m.v_proj, value)  # (B, L, E), (B, S, G*D)
    B, L, S = query.shape[0], query.shape[1], key.shape[1]
    full_mask = torch.ones(B, H, L, S, dtype=torch.bool) if mask is None else mask.expand(B, H, L, S)
    full_bias = torch.zeros(B, H, L, S, dtype=torch.float64)
    if bias is not None:
        full_bias = full_bias + bias.double()
    heads, weights = [], torch.zeros(B, H, L, S, dtype=torch.float64)
    for h in range(H):
        g = h // (H // G)
        q_h = Q[:, :, h * D:(h + 1) * D]  # (B, L, D)
        k_g = K[:, :, g * D:(g + 1) * D]  # (B, S, D)
        v_g = V[:, :, g * D:(g + 1) * D]
        if q_pos is not None:
            q_h, k_g = rotate_pairs(q_h, q_pos), rotate_pairs(k_g, k_pos)
        scores = q_h @ k_g.transpose(1, 2) / math.sqrt(D) + full_bias[:, h]  # (B, L, S)
        scores = scores.masked_fill(~full_mask[:, h], float("-inf"))
        w = torch.softmax(scores, dim=-1)
        w = torch.nan_to_num(w, nan=0.0)  # rows with no allowed key -> zero weights
        weights[:, h] = w
        heads.append(w @ v_g)
    out = lin(m.out_proj, torch.cat(heads, dim=-1))  # (B, L, E)
    return out, weights


def rotate_pairs(x, pos, base=10000.0):
    """RoPE written out: feature pair (2i, 2i+1) times exp(j * pos * base^(-2i/D)), in complex numbers."""
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    z = torch.complex(x[..., 0::2], x[..., 1::2])  # (B, L, D/2)
    z = z * torch.exp(1j * pos.double()[:, None] * theta[None, :])
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)


def randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def random_mask(B, H, L, S, p=0.35, seed=0):
    """Bool mask with both values present and at least one allowed key per row."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, L, S, generator=g) > p
    m[..., torch.randint(S, (1,), generator=g)] = True
    assert m.any() and not m.all()
    return m


def to_torch_mask(mask, B, H, L, S):
    """attnkit bool (True = attend) -> torch 3-D attn_mask (B*H, L, S) with True = ignore."""
    return (~mask).expand(B, H, L, S).reshape(B * H, L, S)


# ---------------------------------------------------------------------------------------------- torch parity
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("head_mask", [False, True])
def test_from_torch_matches_torch_with_mask(bias, head_mask):
    torch.manual_seed(0)
    B, L, S, E, H = 2, 5, 7, 16, 4
    t = randomize(torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=True)).eval()
    m = MultiHeadAttention.from_torch(t)
    q, kv = torch.randn(B, L, E), torch.randn(B, S, E)
    mask = random_mask(B, H if head_mask else 1, L, S)
    out_t, w_t = t(q, kv, kv, attn_mask=to_torch_mask(mask, B, H, L, S), average_attn_weights=False)
    out_m, w_m = m(q, kv, mask=mask, need_weights=True)
    torch.testing.assert_close(out_m, out_t, atol=ATOL, rtol=0)
    torch.testing.assert_close(w_m, w_t, atol=ATOL, rtol=0)
    assert (w_m[~mask.expand_as(w_m)] == 0).all()
    out_a, w_a = m(q, kv, mask=mask, need_weights=True, average_weights=True)
    _, w_t_avg = t(q, kv, kv, attn_mask=to_torch_mask(mask, B, H, L, S), average_attn_weights=True)
    assert w_a.shape == (B, L, S)
    torch.testing.assert_close(w_a, w_t_avg, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_a, out_t, atol=ATOL, rtol=0)


def test_from_torch_kdim_vdim_seq_first_module():
    torch.manual_seed(1)
    B, L, S, E, H = 3, 4, 6, 12, 3
    t = randomize(torch.nn.MultiheadAttention(E, H, kdim=5, vdim=7), seed=1).eval()  # seq-first torch module
    assert not t._qkv_same_embed_dim
    m = MultiHeadAttention.from_torch(t)
    q, k, v = torch.randn(B, L, E), torch.randn(B, S, 5), torch.randn(B, S, 7)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 4:] = True  # torch: True = ignore
    pad[2, 1:] = True
    out_t, w_t = t(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), key_padding_mask=pad,
                   average_attn_weights=False)
    out_m, w_m = m(q, k, v, mask=masks.padding(torch.tensor([4, 6, 1])), need_weights=True)
    torch.testing.assert_close(out_m, out_t.transpose(0, 1), atol=ATOL, rtol=0)
    torch.testing.assert_close(w_m, w_t, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kdim,vdim", [(None, None), (5, 9)])
def test_to_torch_round_trip(kdim, vdim):
    torch.manual_seed(2)
    B, L, S, E, H = 2, 3, 5, 8, 2
    m = randomize(MultiHeadAttention(E, H, kdim=kdim, vdim=vdim), seed=2).eval()
    t = m.to_torch(batch_first=True).eval()
    assert t._qkv_same_embed_dim == (kdim is None)
    q, k, v = torch.randn(B, L, E), torch.randn(B, S, kdim or E), torch.randn(B, S, vdim or E)
    mask = random_mask(B, 1, 1, S, seed=3)  # a key padding pattern
    out_t, _ = t(q, k, v, key_padding_mask=~mask[:, 0, 0], need_weights=False)
    torch.testing.assert_close(m(q, k, v, mask=mask), out_t, atol=ATOL, rtol=0)
    back = MultiHeadAttention.from_torch(t)
    for (name, p), (name2, p2) in zip(m.named_parameters(), back.named_parameters(), strict=True):
        assert name == name2 and torch.equal(p, p2)
    # seq-first export
    t2 = m.to_torch(batch_first=False).eval()
    out_t2, _ = t2(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), need_weights=False)
    torch.testing.assert_close(m(q, k, v), out_t2.transpose(0, 1), atol=ATOL, rtol=0)


def test_dropout_in_training_only():
    torch.manual_seed(3)
    m = MultiHeadAttention(8, 2, dropout=0.5)
    x = torch.randn(2, 6, 8)
    m.eval()
    ref = MultiHeadAttention(8, 2)
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref(x), atol=0, rtol=0)
    m.train()
    torch.manual_seed(7)
    a = m(x)
    torch.manual_seed(7)
    b = m(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, ref(x), atol=1e-3)


# ------------------------------------------------------------------------------------------ float64 reference
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_matches_float64_reference_gqa_mask_bias(num_kv_heads):
    torch.manual_seed(4)
    B, L, S, E, H = 2, 5, 6, 16, 4
    m = randomize(MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, kdim=6), seed=4).double()
    q, k, v = torch.randn(B, L, E).double(), torch.randn(B, S, 6).double(), torch.randn(B, S, E).double()
    mask = random_mask(B, 1, L, S, seed=5)
    mask[1, 0, 2] = False  # a query row with no allowed key
    bias = torch.randn(1, H, L, S).double()
    out, w = m(q, k, v, mask=mask, bias=bias, need_weights=True)
    out_r, w_r = ref_mha(m, q, k, v, mask=mask, bias=bias)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(w, w_r, atol=1e-10, rtol=0)
    assert (w[1, :, 2] == 0).all()
    # the empty row's attention output is zero, so only the output bias remains
    torch.testing.assert_close(out[1, 2], m.out_proj.bias.detach(), atol=1e-12, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """An independent construction: a plain MHA whose k/v projections repeat each GQA head's rows."""
    torch.manual_seed(5)
    B, L, E, H, G = 2, 7, 24, 6, 2
    gqa = randomize(MultiHeadAttention(E, H, num_kv_heads=G), seed=6).eval()
    mha = MultiHeadAttention(E, H).eval()
    D = E // H
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            dst.weight.copy_(src.weight.view(G, D, E).repeat_interleave(H // G, dim=0).reshape(H * D, E))
            dst.bias.copy_(src.bias.view(G, D).repeat_interleave(H // G, dim=0).reshape(H * D))
    x = torch.randn(B, L, E)
    out_g, w_g = gqa(x, mask=masks.causal(), need_weights=True)
    out_m, w_m = mha(x, mask=masks.causal(), need_weights=True)
    torch.testing.assert_close(out_g, out_m, atol=ATOL, rtol=0)
    torch.testing.assert_close(w_g, w_m, atol=ATOL, rtol=0)
    # and the grouping really matters: heads of one group share weights only through K/V
    assert not torch.allclose(w_g[:, 0], w_g[:, 1], atol=1e-4)


def test_mask_objects_equal_dense_masks():
    torch.manual_seed(6)
    B, L, E, H = 3, 6, 8, 2
    m = randomize(MultiHeadAttention(E, H), seed=7).double()
    x = torch.randn(B, L, E).double()
    lengths = torch.tensor([6, 3, 1])
    structured = masks.causal() & masks.padding(lengths)
    j = torch.arange(L)
    dense = (j[None, :] <= j[:, None])[None, None] & (j[None, None, None, :] < lengths[:, None, None, None])
    out_s, w_s = m(x, mask=structured, need_weights=True)
    out_r, w_r = ref_mha(m, x, x, x, mask=dense)
    torch.testing.assert_close(out_s, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(w_s, w_r, atol=1e-10, rtol=0)
    # 2-D (L, S) and 1-D (S,) tensors broadcast as documented
    out_2d = m(x, mask=dense[0, 0])
    out_r2d, _ = ref_mha(m, x, x, x, mask=dense[0, 0][None, None])
    torch.testing.assert_close(out_2d, out_r2d, atol=1e-10, rtol=0)


def test_rotary_matches_reference_and_is_relative():
    torch.manual_seed(7)
    B, L, S, E, H = 2, 3, 5, 16, 2
    m = randomize(MultiHeadAttention(E, H), seed=8).double()
    q, kv = torch.randn(B, L, E).double(), torch.randn(B, S, E).double()
    out = m(q, kv, rotary=True)
    out_r, _ = ref_mha(m, q, kv, kv, q_pos=torch.arange(L) + S - L, k_pos=torch.arange(S))
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    # shifting every position by a constant changes nothing (scores depend on m - n only) ...
    shifted = m(q, kv, rotary=(torch.arange(L) + S - L + 11, torch.arange(S) + 11))
    torch.testing.assert_close(shifted, out, atol=1e-10, rtol=0)
    # ... but rotary does change the result
    assert not torch.allclose(out, m(q, kv), atol=1e-4)
    # a RotaryEmbedding module plugs in as a callable (q, k) -> (q, k), with the same alignment
    from attnkit.nn.positional import RotaryEmbedding

    torch.testing.assert_close(m(q, kv, rotary=RotaryEmbedding(E // H)), out, atol=1e-10, rtol=0)


def test_gradcheck_float64():
    torch.manual_seed(8)
    m = randomize(MultiHeadAttention(4, 2, num_kv_heads=1, kdim=3), seed=9).double()
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True]])  # (1, S) -> broadcast over (L, S)
    bias = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: m(a, b, c, mask=mask, bias=bias), (q, k, v))
    # a non-contiguous query (a chunk of a packed tensor, transposed)
    packed = torch.randn(3, 2, 8, dtype=torch.float64).transpose(0, 1)[..., :4].detach().requires_grad_()
    assert not packed.is_contiguous()
    assert torch.autograd.gradcheck(lambda a: m(a, k.detach(), v.detach(), mask=mask), (packed,))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(embed_dim=10, num_heads=4), ValueError, ["embed_dim", "num_heads", "10", "4"]),
        (dict(embed_dim=12, num_heads=4, num_kv_heads=3), ValueError, ["num_kv_heads", "3", "4"]),
        (dict(embed_dim=0, num_heads=1), ValueError, ["embed_dim"]),
        (dict(embed_dim=8, num_heads=2.0), TypeError, ["num_heads"]),
        (dict(embed_dim=8, num_heads=2, dropout=1.5), ValueError, ["dropout"]),
        (dict(embed_dim=8, num_heads=2, kdim=-1), ValueError, ["kdim"]),
    ],
)
def test_constructor_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        MultiHeadAttention(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_forward_errors_name_the_argument():
    m = MultiHeadAttention(8, 2, kdim=4, vdim=4)
    x, k = torch.randn(2, 5, 8), torch.randn(2, 3, 4)
    cases = [
        (lambda: m(torch.randn(2, 5, 6), k), ValueError, "query"),
        (lambda: m(torch.randn(5, 8), k), ValueError, "query"),
        (lambda: m(x, torch.randn(2, 3, 8)), ValueError, "key"),
        (lambda: m(x, k, torch.randn(2, 4, 4)), ValueError, "key and value"),
        (lambda: m(x, torch.randn(3, 3, 4)), ValueError, "batch"),
        (lambda: m(x, k, torch.randn(2, 3, 8)), ValueError, "vdim"),
        (lambda: m(x, k, mask=torch.ones(2, 5, 3, dtype=torch.bool)), ValueError, "ambiguous"),
        (lambda: m(x, k, mask=torch.ones(5, 4, dtype=torch.bool)), ValueError, "mask must broadcast"),
        (lambda: m(x, k, mask=torch.ones(5, 3)), TypeError, "bias"),
        (lambda: m(x, k, mask=[[True]]), TypeError, "mask"),
        (lambda: m(x, k, bias=torch.ones(5, 3, dtype=torch.bool)), TypeError, "bias"),
        (lambda: m(x, k, bias=torch.ones(1, 3, 5, 3)), ValueError, "bias must broadcast"),
        (lambda: m(x.long(), k), TypeError, "query"),
        (lambda: m(x, k.double()), TypeError, "key"),
        (lambda: m(x, k, rotary="yes"), TypeError, "rotary"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc) as info:
            fn()
        assert word in str(info.value), str(info.value)


def test_conversion_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(8, 4, num_kv_heads=2).to_torch()
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiHeadAttention.from_torch(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="even head_dim"):
        MultiHeadAttention(6, 2)(torch.randn(1, 2, 6), rotary=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_empty_rows_are_zero_not_nan(dtype):
    torch.manual_seed(9)
    m = MultiHeadAttention(8, 2).to(dtype)
    x = (torch.randn(2, 5, 8) * 30).to(dtype)  # large activations: scores far beyond float16 comfort
    out, w = m(x, mask=masks.padding(torch.tensor([0, 3])), need_weights=True)
    assert out.dtype == dtype  # (the weights' dtype is the functional layer's choice)
    assert out.isfinite().all() and w.isfinite().all()
    assert (w[0] == 0).all()
    ref, w_ref = ref_mha(m, x, x, x, mask=masks.padding(torch.tensor([0, 3])).materialize(5, 5, batch_ndim=2))
    torch.testing.assert_close(w.double(), w_ref, atol=2e-2, rtol=0)


def test_autocast_accepts_mixed_input_dtypes():
    m = MultiHeadAttention(8, 2)
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, memory.bfloat16())
    torch.testing.assert_close(out.float(), m(x, memory), atol=5e-2, rtol=0)
    with pytest.raises(TypeError, match="key"):
        m(x, memory.bfloat16())  # outside autocast the mismatch is a mistake


def test_projected_kv_equals_key_value_inputs_and_can_be_extended():
    """``forward(query, kv=project_kv(key, value))`` is ``forward(query, key, value)`` (grouped heads, other
    kdim/vdim, a mask, weights); keys and values projected in two parts and concatenated along S are the whole
    sequence's, which is what a decoder's KV cache relies on."""
    torch.manual_seed(3)
    m = MultiHeadAttention(12, 4, num_kv_heads=2, kdim=6, vdim=5)
    q, k, v = torch.randn(2, 3, 12), torch.randn(2, 7, 6), torch.randn(2, 7, 5)
    mask = masks.padding(torch.tensor([7, 4]))
    want, w_want = m(q, k, v, mask=mask, need_weights=True)
    kv = m.project_kv(k, v)
    assert kv[0].shape == kv[1].shape == (2, 2, 7, 3)
    got, w_got = m(q, kv=kv, mask=mask, need_weights=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w_got, w_want)
    a, b = m.project_kv(k[:, :4], v[:, :4]), m.project_kv(k[:, 4:], v[:, 4:])
    joined = tuple(torch.cat([x, y], 2) for x, y in zip(a, b, strict=True))
    torch.testing.assert_close(m(q, kv=joined, mask=mask), want)


def test_projected_kv_errors_name_the_argument():
    m = MultiHeadAttention(8, 2)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    kv = m.project_kv(k)
    with pytest.raises(ValueError, match="either key/value or kv"):
        m(q, k, kv=kv)
    with pytest.raises(ValueError, match="rotary cannot be combined with kv"):
        m(q, kv=kv, rotary=True)
    with pytest.raises(TypeError, match="kv must be a pair"):
        m(q, kv=[kv[0], kv[1]])
    with pytest.raises(ValueError, match=r"kv must be two \(B, G, S, D\) = \(2, 2, S, 4\)"):
        m(q, kv=(kv[0], kv[1][:, :, :3]))
    with pytest.raises(TypeError, match=r"kv\[0\] must have the dtype"):
        m(q, kv=(kv[0].double(), kv[1]))
    with pytest.raises(ValueError, match="query last dimension must equal embed_dim=8"):
        m(torch.randn(2, 3, 6), kv=kv)
    with pytest.raises(ValueError, match="key last dimension must equal kdim=8"):
        m.project_kv(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="key and value must agree"):
        m.project_kv(k, torch.randn(2, 4, 8))
