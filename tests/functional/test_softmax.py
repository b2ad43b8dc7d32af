"""attnkit.functional.softmax: masked_softmax and the normalizers vs the float64 oracle (tests/reference.py).

Proves: rows sum to 1 over allowed keys and masked entries are exactly 0; a row with no allowed key is exactly
zero, NaN-free, with finite gradients in float32/float16/bfloat16 (and float64); NaN/inf sitting in masked-out
scores reach neither the weights nor the gradients; float16 scores at the edge of the range (65504) and scores
that only exceed it after scaling inside ``attention`` do not overflow; none/relu/sigmoid are elementwise then
zero where masked.
"""

import pytest
import torch

from attnkit.functional import attention
from attnkit.functional.softmax import NORMALIZERS, get_normalizer, masked_softmax
from reference import assert_mixed, masked_softmax_ref, normalize_ref, random_mask

F64 = torch.float64
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6, F64: 1e-12}


def test_hand_computed_row():
    # scores (0, ln 3, 99) with the last key masked: weights (1/4, 3/4, 0)
    s = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item(), 99.0]], dtype=F64)
    m = torch.tensor([[True, True, False]])
    expect = torch.tensor([[0.25, 0.75, 0.0]], dtype=F64)
    torch.testing.assert_close(masked_softmax(s, m), expect)
    torch.testing.assert_close(masked_softmax_ref(s, m), expect)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_oracle_rows_sum_to_one(gen, dtype):
    scores = (torch.randn(2, 3, 6, 9, generator=gen) * 4).to(dtype)
    mask = random_mask((2, 1, 6, 9), gen, p=0.5)
    mask[0, 0, 2] = False  # one fully masked row
    assert_mixed(mask)
    w = masked_softmax(scores, mask)
    assert w.dtype == dtype and w.shape == scores.shape
    ref = masked_softmax_ref(scores, mask)
    torch.testing.assert_close(w.double(), ref, rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])
    full = mask.expand(scores.shape)
    assert bool((w[~full] == 0).all())
    sums = w.double().sum(-1)
    has_key = full.any(-1)
    torch.testing.assert_close(sums[has_key], torch.ones_like(sums[has_key]), rtol=0, atol=8 * HALF_TOL[dtype])
    assert bool((sums[~has_key] == 0).all()) and not bool(has_key.all())


def test_no_mask_equals_torch_softmax(gen):
    s = torch.randn(3, 5, 7, generator=gen)
    torch.testing.assert_close(masked_softmax(s), torch.softmax(s, -1))
    torch.testing.assert_close(masked_softmax(s, None, dim=-2), torch.softmax(s, -2))


def test_other_dim_and_non_contiguous_scores(gen):
    scores = torch.randn(2, 7, 5, generator=gen, dtype=F64).transpose(-1, -2)  # (2, 5, 7), non-contiguous
    mask = random_mask((2, 5, 7), gen)
    mask[:, :, 3] = False  # a column with nothing allowed: an empty "row" along dim -2
    assert_mixed(mask)
    torch.testing.assert_close(masked_softmax(scores, mask), masked_softmax_ref(scores, mask))
    along_queries = masked_softmax(scores, mask, dim=-2)
    expect = masked_softmax_ref(scores.transpose(-1, -2), mask.transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(along_queries, expect)
    assert bool((along_queries[:, :, 3] == 0).all())


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_rows_zero_with_finite_gradients(gen, dtype):
    scores = torch.randn(2, 4, 5, generator=gen).to(dtype).requires_grad_()
    mask = random_mask((2, 4, 5), gen)
    mask[:, 1] = False
    mask[1] = False  # a whole batch element with nothing to attend
    assert_mixed(mask)
    w = masked_softmax(scores, mask)
    assert bool((w[:, 1] == 0).all()) and bool((w[1] == 0).all())
    assert not bool(w.isnan().any())
    (w * torch.randn(w.shape, generator=gen).to(dtype)).sum().backward()
    assert bool(scores.grad.isfinite().all())
    assert bool((scores.grad[~mask] == 0).all())  # no gradient flows into masked-out scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_masked_scores_do_not_leak(gen, dtype, bad):
    scores = torch.randn(3, 6, generator=gen).to(dtype)
    mask = random_mask((3, 6), gen)
    mask[:, 0] = True
    mask[2] = False
    assert_mixed(mask)
    clean = masked_softmax(scores, mask)
    dirty_scores = scores.masked_fill(~mask, bad).requires_grad_()
    dirty = masked_softmax(dirty_scores, mask)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    dirty.sum().backward()
    assert bool(dirty_scores.grad.isfinite().all())


def test_float16_scores_at_range_edge(gen):
    # 65504 is the largest float16; exp(65504 - 60000) in float16 would be inf: computed in float32 instead
    s = torch.tensor([[65504.0, 60000.0, -65504.0, 65504.0], [-65504.0, -65504.0, -65000.0, 0.0]], dtype=torch.float16)
    m = torch.tensor([[True, True, True, False], [True, True, False, False]])
    w = masked_softmax(s, m)
    assert w.dtype == torch.float16 and bool(w.isfinite().all())
    torch.testing.assert_close(w.double(), masked_softmax_ref(s, m), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(w.double(), torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0]], dtype=F64))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_float16_scores_beyond_range_after_scaling(gen, backend):
    """q.k fits in float16, scale * q.k (up to ~1e5) does not: the weights must still be the float64 ones."""
    q = torch.randn(1, 2, 4, 8, generator=gen) * 3
    k = torch.randn(1, 2, 6, 8, generator=gen) * 3
    v = torch.randn(1, 2, 6, 8, generator=gen)
    scale = 4000.0
    mask = random_mask((4, 6), gen, p=0.7)
    mask[:, 0] = True
    assert_mixed(mask)
    # float16 rounding of q and k moves scores of size 1e5 by ~50, so the oracle takes the rounded inputs
    s16 = (q.half().double() @ k.half().double().transpose(-1, -2)) * scale
    assert bool(((s16 > 65504) & mask).any())  # allowed scores really beyond float16 after scaling
    expect = masked_softmax_ref(s16, mask) @ v.half().double()
    out = attention(q.half(), k.half(), v.half(), score="dot", scale=scale, mask=mask, backend=backend)
    assert not bool(out.isnan().any()) and not bool(out.isinf().any())
    torch.testing.assert_close(out.double(), expect, rtol=1e-2, atol=1e-2)


# ---- the other normalizers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "relu", "sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
def test_normalizers_match_oracle_and_zero_masked(gen, kind, dtype):
    scores = torch.randn(2, 5, 7, generator=gen).to(dtype)
    mask = random_mask((2, 5, 7), gen)
    mask[0, 3] = False
    assert_mixed(mask)
    dirty = scores.masked_fill(~mask, float("nan"))  # masked NaN must not leak
    w = get_normalizer(kind)(dirty, mask)
    assert w.dtype == dtype and not bool(w.isnan().any())
    torch.testing.assert_close(w.double(), normalize_ref(scores, mask, kind), rtol=HALF_TOL[dtype],
                               atol=HALF_TOL[dtype])
    assert bool((w[~mask] == 0).all()) and bool((w[0, 3] == 0).all())
    assert NORMALIZERS[kind] is get_normalizer(kind)


@pytest.mark.parametrize("kind", ["none", "relu", "sigmoid"])
def test_normalizers_through_attention(gen, kind):
    from reference import attention_ref

    q, k, v = (torch.randn(2, 3, n, 4, generator=gen, dtype=F64) for n in (5, 6, 6))
    mask = random_mask((5, 6), gen)
    for backend in ("auto", "math"):
        out, w = attention(q, k, v, mask=mask, normalize=kind, return_weights=True, backend=backend)
        ref_out, ref_w = attention_ref(q, k, v, mask=mask, normalize=kind)
        torch.testing.assert_close(w, ref_w)
        torch.testing.assert_close(out, ref_out)


def test_callable_normalizer_is_used(gen):
    q, k, v = (torch.randn(2, n, 4, generator=gen, dtype=F64) for n in (3, 5, 5))
    mask = random_mask((3, 5), gen)
    seen = {}

    def half_softmax(scores, m):
        seen["mask"] = m
        return 0.5 * masked_softmax(scores, m)

    out = attention(q, k, v, mask=mask, normalize=half_softmax)
    from reference import attention_ref

    torch.testing.assert_close(out, 0.5 * attention_ref(q, k, v, mask=mask)[0])
    assert torch.equal(seen["mask"].expand(2, 3, 5), mask.expand(2, 3, 5))


def test_bad_normalizer_name():
    with pytest.raises(ValueError, match=r"normalize must be one of \['none', 'relu', 'sigmoid', 'softmax'\]"):
        get_normalizer("tanh")


@pytest.mark.parametrize("backend", ["auto", "math", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extreme_inputs_stay_finite_and_convex(gen, backend, dtype):
    """bf16 inputs of 133120 (scores ~1e10) and float16 inputs of 200 (q.k ~ 3e5 > 65504): no NaN, and every
    output feature lies within [min, max] of the allowed values (the weights are a convex combination)."""
    big = 133120.0 if dtype == torch.bfloat16 else 200.0
    q = (torch.randn(2, 2, 5, 8, generator=gen).sign() * big).to(dtype)
    k = (torch.randn(2, 2, 7, 8, generator=gen).sign() * big).to(dtype)
    v = torch.randn(2, 2, 7, 3, generator=gen).to(dtype)
    mask = random_mask((5, 7), gen, p=0.6)
    mask[:, 0] = True
    assert_mixed(mask)
    out = attention(q, k, v, mask=mask, score="dot", backend=backend)
    assert bool(out.isfinite().all())
    allowed = mask[None, None, :, :, None]  # (1, 1, L, S, 1)
    vv = v.double().unsqueeze(-3)  # (B, H, 1, S, Dv)
    lo = torch.where(allowed, vv, torch.inf).amin(-2)
    hi = torch.where(allowed, vv, -torch.inf).amax(-2)
    slack = 1e-2 * (hi - lo).abs().amax()
    assert bool((out.double() >= lo - slack).all()) and bool((out.double() <= hi + slack).all())
