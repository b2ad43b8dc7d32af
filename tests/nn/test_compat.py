"""attnkit.nn.compat.MultiheadAttention is a drop-in for torch.nn.MultiheadAttention: same state_dict, same
outputs and weights for every mask form torch accepts (torch's meaning: bool True = IGNORE, float = added)."""

import pytest
import torch

from attnkit.nn.compat import MultiheadAttention

# torch warns when key_padding_mask and attn_mask differ in type; we test that mix on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")

ATOL = 1e-5
N, L, S, E, H = 3, 5, 6, 8, 2


def pair(seed=0, **kwargs):
    """A torch module with random weights and a compat module loaded from its state_dict, both in eval."""
    torch.manual_seed(seed)
    t = torch.nn.MultiheadAttention(E, H, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    c = MultiheadAttention(E, H, **kwargs)
    c.load_state_dict(t.state_dict())  # strict: the same names and shapes
    return t.eval(), c.eval()


def inputs(batch_first, kdim=E, vdim=E, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, L, E, generator=g)
    k, v = torch.randn(N, S, kdim, generator=g), torch.randn(N, S, vdim, generator=g)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (L, N, E)
    return q, k, v


def ignore_mask(*shape, seed=2):
    """torch-style bool mask (True = ignore) with both values and never a whole row ignored."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) < 0.4
    m[..., 0] = False
    assert m.any() and not m.all()
    return m


def float_mask(*shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=g)
    m[..., 1] = float("-inf")  # torch accepts -inf in float masks
    return m


def assert_same(t, c, *args, **kwargs):
    out_t, w_t = t(*args, **kwargs)
    out_c, w_c = c(*args, **kwargs)
    assert out_c.shape == out_t.shape
    torch.testing.assert_close(out_c, out_t, atol=ATOL, rtol=0)
    if w_t is None:
        assert w_c is None
    else:
        assert w_c.shape == w_t.shape
        torch.testing.assert_close(w_c, w_t, atol=ATOL, rtol=0)
    return out_c, w_c


MASK_CASES = {
    "none": lambda: {},
    "kpm_bool": lambda: dict(key_padding_mask=ignore_mask(N, S)),
    "kpm_float": lambda: dict(key_padding_mask=float_mask(N, S)),
    "attn_bool_2d": lambda: dict(attn_mask=ignore_mask(L, S)),
    "attn_bool_3d": lambda: dict(attn_mask=ignore_mask(N * H, L, S)),
    "attn_float_2d": lambda: dict(attn_mask=float_mask(L, S)),
    "attn_float_3d": lambda: dict(attn_mask=float_mask(N * H, L, S)),
    "both_bool": lambda: dict(attn_mask=ignore_mask(L, S), key_padding_mask=ignore_mask(N, S, seed=5)),
    "float_attn_bool_kpm": lambda: dict(attn_mask=float_mask(N * H, L, S),
                                        key_padding_mask=ignore_mask(N, S)),
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_same_outputs_and_weights_as_torch(batch_first, case):
    t, c = pair(batch_first=batch_first)
    q, k, v = inputs(batch_first)
    kw = MASK_CASES[case]()
    _, w = assert_same(t, c, q, k, v, **kw)
    assert w.shape == (N, L, S)
    _, w = assert_same(t, c, q, k, v, average_attn_weights=False, **kw)
    assert w.shape == (N, H, L, S)
    assert_same(t, c, q, k, v, need_weights=False, **kw)


@pytest.mark.parametrize("kwargs", [
    dict(kdim=3, vdim=5), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=4, vdim=4),
], ids=str)
def test_constructor_variants(kwargs):
    t, c = pair(batch_first=True, **kwargs)
    assert set(c.state_dict()) == set(t.state_dict())
    q, k, v = inputs(True, kwargs.get("kdim", E), kwargs.get("vdim", E))
    kw = dict(attn_mask=ignore_mask(L, S), key_padding_mask=ignore_mask(N, S, seed=6))
    assert_same(t, c, q, k, v, average_attn_weights=False, **kw)
    assert_same(t, c, q, k, v, attn_mask=float_mask(N * H, L, S))


def test_state_dict_loads_back_into_torch():
    _, c = pair(kdim=3, vdim=5, batch_first=True)
    t2 = torch.nn.MultiheadAttention(E, H, kdim=3, vdim=5, batch_first=True).eval()
    t2.load_state_dict(c.state_dict())
    assert_same(t2, c, *inputs(True, 3, 5))


def test_is_causal_with_causal_mask():
    t, c = pair(batch_first=True)
    x = inputs(True)[0]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)  # float: 0 / -inf
    out, w = assert_same(t, c, x, x, x, attn_mask=causal, is_causal=True, average_attn_weights=False)
    assert (w[..., torch.triu(torch.ones(L, L, dtype=torch.bool), 1)] == 0).all()
    assert_same(t, c, x, x, x, attn_mask=causal.isinf(), is_causal=True, need_weights=False)
    with pytest.raises(ValueError, match="attn_mask"):
        c(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError):  # torch raises RuntimeError here; ours is both
        c(x, x, x, is_causal=True)


@pytest.mark.parametrize("average", [True, False])
def test_unbatched_input(average):
    t, c = pair(batch_first=False)
    q, k, v = (a[:, 0] for a in inputs(False))  # (L, E), (S, E)
    _, w = assert_same(t, c, q, k, v, average_attn_weights=average)
    assert w.shape == ((L, S) if average else (H, L, S))
    kw = dict(key_padding_mask=ignore_mask(S), attn_mask=ignore_mask(H, L, S, seed=9))
    assert_same(t, c, q, k, v, average_attn_weights=average, **kw)


def test_gradients_match_torch():
    t, c = pair(batch_first=True)
    t.train(), c.train()  # dropout is 0: training mode only changes torch's path, not the result
    q, k, v = inputs(True)
    kw = dict(key_padding_mask=ignore_mask(N, S), attn_mask=float_mask(L, S))
    for m in (t, c):
        m.zero_grad()
        out, w = m(q, k, v, **kw)
        (out.square().sum() + w.sum()).backward()
    for (name, p_t), (_, p_c) in zip(t.named_parameters(), c.named_parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p_t.grad, atol=1e-4, rtol=1e-5, msg=name)


def test_drop_in_inside_torch_encoder_layer():
    torch.manual_seed(11)
    layer = torch.nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True).train()
    x = torch.randn(N, L, E)
    pad = ignore_mask(N, L)
    expected = layer(x, src_key_padding_mask=pad)  # training mode: torch's python path
    with torch.no_grad():
        expected_fast = layer.eval()(x)  # eval without autograd: torch's fast path
    c = MultiheadAttention(E, H, batch_first=True)
    c.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = c
    calls = []
    c.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(layer.train()(x, src_key_padding_mask=pad), expected, atol=ATOL, rtol=0)
    assert calls, "the layer must have called compat's forward"
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), expected_fast, atol=ATOL, rtol=0)


def test_same_class_contract_and_initialisation_as_torch():
    for kwargs in (dict(), dict(kdim=3, vdim=5, add_bias_kv=True)):
        torch.manual_seed(12)
        t = torch.nn.MultiheadAttention(E, H, **kwargs)
        torch.manual_seed(12)
        c = MultiheadAttention(E, H, **kwargs)
        assert isinstance(c, torch.nn.MultiheadAttention)
        sd_t, sd_c = t.state_dict(), c.state_dict()
        assert list(sd_c) == list(sd_t)
        for name in sd_t:
            assert torch.equal(sd_c[name], sd_t[name]), name
        assert (c.batch_first, c.head_dim, c.dropout) == (t.batch_first, t.head_dim, t.dropout)


def test_fully_masked_row_is_zero_not_nan():
    """The one documented difference: torch gives NaN for a query with no allowed key; attnkit gives zeros."""
    t, c = pair(batch_first=True)
    q, k, v = inputs(True)
    attn_mask = torch.zeros(L, S, dtype=torch.bool)
    attn_mask[2] = True  # query 2 may not attend anything
    out_t, _ = t(q, k, v, attn_mask=attn_mask)
    assert out_t[:, 2].isnan().all()
    for m in (attn_mask, torch.where(attn_mask, float("-inf"), 0.0)):
        out, w = c(q, k, v, attn_mask=m, average_attn_weights=False)
        assert (w[:, :, 2] == 0).all()
        torch.testing.assert_close(out[:, 2], c.out_proj.bias.detach().expand(N, E), atol=1e-6, rtol=0)
        keep = torch.arange(L) != 2
        torch.testing.assert_close(out[:, keep], out_t[:, keep], atol=ATOL, rtol=0)


def test_bad_input_names_the_argument():
    _, c = pair(batch_first=True)
    q, k, v = inputs(True)
    cases = [
        (lambda: c(q, k, v, key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool)), "key_padding_mask"),
        (lambda: c(q, k, v, attn_mask=torch.zeros(S, L, dtype=torch.bool)), "attn_mask"),
        (lambda: c(q, k, v, attn_mask=torch.zeros(N, L, S, dtype=torch.bool)), "attn_mask"),
        (lambda: c(q, k, v, attn_mask=torch.zeros(1, 1, L, S, dtype=torch.bool)), "attn_mask"),
        (lambda: c(q[..., :4], k, v), "query"),
        (lambda: c(q, k[:, :2], v), "key and value"),
        (lambda: c(q[:2], k, v), "batch"),
        (lambda: c(q[0, 0], k, v), "query"),
    ]
    for fn, word in cases:
        with pytest.raises(ValueError) as info:
            fn()
        assert word in str(info.value), str(info.value)
    with pytest.raises(TypeError, match="key_padding_mask"):
        c(q, k, v, key_padding_mask=torch.zeros(N, S, dtype=torch.long))
    with pytest.raises(TypeError, match="value"):
        c(q, k, v.double())
    with pytest.raises(ValueError, match="num_heads"):
        MultiheadAttention(10, 4)


def test_autocast_mixed_dtypes_like_torch():
    t, c = pair(batch_first=True)
    q, k, v = inputs(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kw = dict(attn_mask=float_mask(L, S), key_padding_mask=ignore_mask(N, S))
        out_t, w_t = t(q, k.bfloat16(), v.bfloat16(), **kw)
        out_c, w_c = c(q, k.bfloat16(), v.bfloat16(), **kw)
    assert out_c.dtype == out_t.dtype
    torch.testing.assert_close(out_c.float(), out_t.float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(w_c.float(), w_t.float(), atol=3e-2, rtol=0)


# ---- the swap changes nothing downstream: layouts, graph capture, nested input, exception types ----------------

def _modes():
    """(training, no_grad): torch's slow path in training and with autograd, its fast path in eval + no_grad."""
    return [(True, False), (False, False), (False, True)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training,no_grad", _modes())
def test_output_strides_match_torch_per_layout_and_path(batch_first, training, no_grad):
    t, c = pair(batch_first=batch_first)
    t.train(training), c.train(training)
    q, k, v = inputs(batch_first)
    unbatched = tuple(a[:, 0] if not batch_first else a[0] for a in (q, k, v))
    calls = [((q, q, q), {}), ((q, k, v), {}), ((q, q, q), dict(need_weights=False)),
             ((q, q, q), dict(average_attn_weights=False)), (unbatched, {}),
             ((q, q, q), dict(key_padding_mask=ignore_mask(N, L)))]
    seen = []
    with torch.set_grad_enabled(not no_grad):
        for args, kw in calls:
            out_t, w_t = t(*args, **kw)
            out_c, w_c = c(*args, **kw)
            assert out_c.stride() == out_t.stride(), (args[0].shape, kw)
            if w_t is not None:
                assert w_c.stride() == w_t.stride(), (args[0].shape, kw)
            seen.append(out_t.is_contiguous())
            torch.testing.assert_close(out_c, out_t, atol=ATOL, rtol=0)
    if batch_first:  # self-attention (q, q, q): torch's slow path hands back a transposed view, its fast path not
        assert seen[0] == (no_grad and not training)


def test_a_following_dropout_draws_the_same_pattern():
    """Seeded training reproduces across the swap: nn.Dropout on the output draws per memory layout."""
    t, c = pair(batch_first=True)
    t.train(), c.train()
    x = inputs(True)[0]
    drop = torch.nn.Dropout(0.5)
    outs = []
    for m in (t, c):
        torch.manual_seed(7)
        outs.append(drop(m(x, x, x, need_weights=False)[0]))
    assert (outs[0] == 0).any()
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=0)


def test_compile_fullgraph_and_export_with_masks():
    _, c = pair(batch_first=True)
    x = inputs(True)[0]
    kw = dict(key_padding_mask=ignore_mask(N, L), attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L))
    ref = c(x, x, x, **kw)[0]
    torch._dynamo.reset()
    compiled = torch.compile(c, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x, x, x, **kw)[0], ref, atol=ATOL, rtol=0)
    exported = torch.export.export(c, (x, x, x), kw)
    torch.testing.assert_close(exported.module()(x, x, x, **kw)[0], ref, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("need_weights", [True, False])
def test_nested_tensor_input_where_torch_accepts_it(need_weights):
    t, c = pair(batch_first=True)
    g = torch.Generator().manual_seed(4)
    nt = torch.nested.nested_tensor([torch.randn(3, E, generator=g), torch.randn(5, E, generator=g)])
    out_t, w_t = t(nt, nt, nt, need_weights=need_weights)
    out_c, w_c = c(nt, nt, nt, need_weights=need_weights)
    assert out_c.is_nested and out_t.is_nested
    for a, b in zip(out_t.unbind(), out_c.unbind(), strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    if need_weights:
        torch.testing.assert_close(w_c, w_t, atol=ATOL, rtol=0)
    t.train(), c.train()  # off torch's fast path: torch refuses NestedTensor with AssertionError, so do we
    for m in (t, c):
        with pytest.raises(AssertionError, match="NestedTensor outside of its fast path"):
            m(nt, nt, nt)


def test_invalid_inputs_raise_torch_exception_types():
    """Each bad call raises in torch and in the compat class alike: torch's type (AssertionError for shapes,
    RuntimeError for is_causal without a mask) and, for ours, also ValueError / TypeError."""
    for batch_first in (True, False):
        t, c = pair(batch_first=batch_first)
        q3, q2 = torch.randn(4, 4, E), torch.randn(4, E)
        b = torch.tensor([False, True, True, False])
        cases = [
            (q3, torch.randn(4, E), q3, {}), (q3, q3, torch.randn(4, E), {}),
            (q3, q3, q3, dict(key_padding_mask=b)), (q3, q3, q3, dict(attn_mask=b)),
            (q2, q3, q2, {}), (q2, q2, q3, {}), (q2, q2, q2, dict(key_padding_mask=b[None].repeat(2, 2))),
            (q2, q2, q2, dict(attn_mask=b)), (q2, q2, q2, dict(attn_mask=torch.zeros(5, 4, 4, dtype=torch.bool))),
            (torch.randn(E), torch.randn(E), torch.randn(E), {}),
        ]
        for q, k, v, kw in cases:
            with pytest.raises(AssertionError) as torch_error:
                t(q, k, v, **kw)
            with pytest.raises(AssertionError) as ours:
                c(q, k, v, **kw)
            assert isinstance(ours.value, ValueError)
            words = str(torch_error.value).split(" but ")[0]  # torch's wording, up to what it found
            assert words in str(ours.value), (str(torch_error.value), str(ours.value))
        with pytest.raises(RuntimeError):
            t(q3, q3, q3, is_causal=True)
        with pytest.raises(RuntimeError):
            c(q3, q3, q3, is_causal=True)
        with pytest.raises(AssertionError):  # torch: only bool and floating masks
            t(q3, q3, q3, key_padding_mask=torch.zeros(4, 4, dtype=torch.uint8))
        with pytest.raises(AssertionError, match="only bool and floating types"):
            c(q3, q3, q3, key_padding_mask=torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        torch.nn.MultiheadAttention(10, 4)
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        MultiheadAttention(10, 4)


def test_torch_jit_script_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="torch.compile"):
        torch.jit.script(MultiheadAttention(E, H))


@torch.no_grad()
def test_a_bias_of_another_dtype_is_promoted_as_torch_does():
    t, c = pair(batch_first=True)
    t, c = t.double(), c.double()
    for m in (t, c):
        m.in_proj_bias = torch.nn.Parameter(m.in_proj_bias.half())
    x = inputs(True)[0].double()
    out_t, _ = t(x, x, x)  # torch: the dtypes differ, so no fast path; matmul + add promote
    out_c, _ = c(x, x, x)
    assert out_c.dtype == out_t.dtype == torch.float64
    torch.testing.assert_close(out_c, out_t, atol=1e-10, rtol=0)


def test_is_causal_hint_replaces_the_mask_as_torch_does():
    """torch: is_causal with no key padding and need_weights=False runs SDPA's causal mask (top-left) and does
    not read attn_mask, even one of another size (here L = 1 query against S = 1 key, mask 2 x 2)."""
    t, c = pair(batch_first=False)
    x = inputs(False)[0][:1]  # (1, N, E)
    wrong = torch.nn.Transformer.generate_square_subsequent_mask(2)
    out_t, _ = t(x, x, x, attn_mask=wrong, need_weights=False, is_causal=True)
    out_c, _ = c(x, x, x, attn_mask=wrong, need_weights=False, is_causal=True)
    torch.testing.assert_close(out_c, out_t, atol=ATOL, rtol=0)
    xl = inputs(False)[0]  # (L, N, E) with a real causal mask: the same either way
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    assert_same(t, c, xl, xl, xl, attn_mask=causal, need_weights=False, is_causal=True)
