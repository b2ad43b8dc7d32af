"""AdditiveAttention / DotProductAttention against d2l's formulas written out in float64 loops here."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.nn.scoring import AdditiveAttention, DotProductAttention


def ref_masked_softmax(scores, valid_lens):
    """d2l's masked softmax over the last axis: keys j >= valid_len are dropped.

    valid_lens ``(B,)`` (one length per batch) or ``(B, L)`` (one per query). attnkit's rule for a row with no
    valid key: zero weights (d2l would spread them uniformly because it fills with -1e6).
    """
    B, L, S = scores.shape
    out = torch.zeros(B, L, S, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            if valid_lens is None:
                n = S
            elif valid_lens.dim() == 1:
                n = int(valid_lens[b])
            else:
                n = int(valid_lens[b, i])
            ex = [math.exp(float(scores[b, i, j])) for j in range(n)]
            for j in range(n):
                out[b, i, j] = ex[j] / sum(ex)
    return out


def ref_additive(module, q, k, v, valid_lens):
    """score(q, k) = w_v^T tanh(W_q q + W_k k), masked softmax, weights @ values; plain float64 loops."""
    W_q = module.W_q.weight.detach().double()  # (h, Dq)
    W_k = module.W_k.weight.detach().double()  # (h, Dk)
    w_v = module.w_v.weight.detach().double()[0]  # (h,)
    q, k, v = q.double(), k.double(), v.double()
    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    scores = torch.empty(B, L, S, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            for j in range(S):
                scores[b, i, j] = torch.dot(w_v, torch.tanh(W_q @ q[b, i] + W_k @ k[b, j]))
    weights = ref_masked_softmax(scores, valid_lens)
    return weights @ v, weights


def ref_dot(q, k, v, valid_lens):
    """score(q, k) = q . k / sqrt(d), masked softmax, weights @ values; plain float64 loops."""
    q, k, v = q.double(), k.double(), v.double()
    B, L, S, d = q.shape[0], q.shape[1], k.shape[1], q.shape[-1]
    scores = torch.empty(B, L, S, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            for j in range(S):
                scores[b, i, j] = sum(q[b, i, t] * k[b, j, t] for t in range(d)) / math.sqrt(d)
    weights = ref_masked_softmax(scores, valid_lens)
    return weights @ v, weights


def _inputs(seed, B=2, L=3, S=5, Dq=4, Dk=6, Dv=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Dq, generator=g, dtype=dtype)
    k = torch.randn(B, S, Dk, generator=g, dtype=dtype)
    v = torch.randn(B, S, Dv, generator=g, dtype=dtype)
    return q, k, v


VALID_LENS = [None, torch.tensor([2, 5]), torch.tensor([[1, 3, 5], [4, 2, 2]])]


@pytest.mark.parametrize("valid_lens", VALID_LENS, ids=["none", "per_batch", "per_query"])
def test_additive_matches_d2l_formula(valid_lens):
    torch.manual_seed(0)
    module = AdditiveAttention(key_size=6, query_size=4, num_hiddens=8, dtype=torch.float64)
    q, k, v = _inputs(1, dtype=torch.float64)
    out, weights = module(q, k, v, valid_lens, return_weights=True)
    ref_out, ref_w = ref_additive(module, q, k, v, valid_lens)
    torch.testing.assert_close(weights, ref_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    # float32 module with the same weights: within float32 round-off of the float64 reference
    module32 = AdditiveAttention(6, 4, 8)
    module32.load_state_dict({name: p.float() for name, p in module.state_dict().items()})
    out32 = module32(q.float(), k.float(), v.float(), valid_lens)
    torch.testing.assert_close(out32.double(), ref_out, rtol=3e-5, atol=3e-6)


@pytest.mark.parametrize("valid_lens", VALID_LENS, ids=["none", "per_batch", "per_query"])
def test_dot_product_matches_d2l_formula_and_sdpa(valid_lens):
    q, k, v = _inputs(2, Dk=4)
    out, weights = DotProductAttention()(q, k, v, valid_lens, return_weights=True)
    ref_out, ref_w = ref_dot(q, k, v, valid_lens)
    torch.testing.assert_close(weights.double(), ref_w, rtol=3e-5, atol=3e-6)
    torch.testing.assert_close(out.double(), ref_out, rtol=3e-5, atol=3e-6)
    # and torch's own kernel, with the boolean mask built by hand (True = may attend)
    lens = torch.full((2,), 5) if valid_lens is None else valid_lens
    lens = lens[:, None].expand(2, 3) if lens.dim() == 1 else lens
    keep = torch.arange(5)[None, None, :] < lens[:, :, None]  # (B, L, S)
    assert keep.any() and not keep.all() or valid_lens is None
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_zero_valid_len_gives_zero_row_not_nan():
    q, k, v = _inputs(3, Dk=4)
    valid_lens = torch.tensor([[0, 2, 5], [1, 0, 3]])
    for module in (DotProductAttention(), AdditiveAttention(4, 4, 5)):
        out, weights = module(q, k, v, valid_lens, return_weights=True)
        assert torch.isfinite(out).all()
        assert (weights[0, 0] == 0).all() and (out[0, 0] == 0).all()
        assert (weights[1, 1] == 0).all() and (out[1, 1] == 0).all()
        torch.testing.assert_close(weights[0, 1].sum(), torch.tensor(1.0))


def test_masked_keys_do_not_matter():
    q, k, v = _inputs(4, Dk=4)
    valid_lens = torch.tensor([2, 3])
    k2, v2 = k.clone(), v.clone()
    # large finite values: NaN/inf in masked values currently leak through functional.attention (0 * nan)
    k2[0, 2:], v2[0, 2:] = 1e4, 1e6
    k2[1, 3:], v2[1, 3:] = -1e4, -1e6
    for module in (DotProductAttention(), AdditiveAttention(4, 4, 5)):
        torch.testing.assert_close(module(q, k2, v2, valid_lens), module(q, k, v, valid_lens))


def test_heads_layout_and_padding():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))  # (B, H, L, D), S = L = 4
    valid_lens = torch.tensor([1, 3])
    out = DotProductAttention()(q, k, v, valid_lens)
    keep = (torch.arange(4)[None, :] < valid_lens[:, None])[:, None, None, :]  # (B, 1, 1, S)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_dropout_only_in_training_and_weights_not_stored():
    q, k, v = _inputs(6, Dk=4)
    for module in (DotProductAttention(dropout=0.5), AdditiveAttention(4, 4, 5, dropout=0.5)):
        module.eval()
        ref = module(q, k, v)
        torch.testing.assert_close(module(q, k, v), ref)
        module.train()
        torch.manual_seed(0)
        out, weights = module(q, k, v, return_weights=True)
        assert (weights == 0).any()  # some weights dropped
        torch.testing.assert_close(out, weights @ v)  # returned weights are the ones applied
        assert not any(isinstance(val, torch.Tensor) and val.shape == weights.shape for val in vars(module).values())


def test_gradients_reach_every_parameter():
    q, k, v = _inputs(7)
    module = AdditiveAttention(6, 4, 8)
    module(q, k, v, torch.tensor([3, 5])).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda: AdditiveAttention(0, 4, 8), ValueError, "key_size"),
        (lambda: AdditiveAttention(4, 4.0, 8), TypeError, "query_size"),
        (lambda: AdditiveAttention(4, 4, 8, dropout=1.0), ValueError, "dropout"),
        (lambda: DotProductAttention(dropout=-0.1), ValueError, "dropout"),
        (lambda: DotProductAttention()(*_inputs(0, Dk=5)), ValueError, "queries and keys"),
        (lambda: AdditiveAttention(6, 3, 8)(*_inputs(0)), ValueError, "query_size"),
        (lambda: AdditiveAttention(5, 4, 8)(*_inputs(0)), ValueError, "key_size"),
        (lambda: DotProductAttention()(*_inputs(0, Dk=4), torch.tensor([1.0, 2.0])), TypeError, "valid_lens"),
        (lambda: DotProductAttention()(*_inputs(0, Dk=4), torch.tensor([1, 2, 3])), ValueError, "valid_lens"),
        (lambda: DotProductAttention()(*_inputs(0, Dk=4), torch.tensor([1, 6])), ValueError, "valid_lens"),
        (lambda: DotProductAttention()(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)), ValueError,
         "queries"),
    ],
)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
