"""The non-finite rule, one parametrized test over every backend and dtype (docs/architecture.md):

* a NaN/inf in a key or value that a query may not see never reaches that query's output or any gradient;
* a NaN in a padded (fully masked) query row does not poison other rows' gradients;
* half-precision scores are accumulated in float32 (q . k may exceed 65504 where the scaled score does not);
* ``scale`` of inf/NaN is refused; D = 0 and B = 0 give an empty result or a clear error.
"""

from __future__ import annotations

import pytest
import torch

from attnkit import masks
from attnkit.functional import attention
from attnkit.kernels.dispatch import BACKENDS
from reference import attention_ref, window_ref

B, H, L, D = 2, 2, 40, 8
W = 6  # window(W, 0): query i sees keys i - 6 .. i
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _mask_for(backend: str):
    if backend == "graph":  # the same band as an edge list
        i = torch.arange(L).repeat_interleave(W + 1)
        j = i - torch.arange(W + 1).repeat(L)
        keep = j >= 0
        return masks.graph(torch.stack([j[keep], i[keep]]), num_nodes=L)
    return masks.window(W, 0)


def _qkv(dtype, gen, device):
    return [torch.randn(B, H, L, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_nonfinite_keys_values_and_padded_queries_stay_where_they_belong(backend, dtype, gen, device):
    mask = _mask_for(backend)
    q, k, v = _qkv(dtype, gen, device)
    bad = L - 1  # key/value position seen by the last query only
    with torch.no_grad():
        q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
        k_in[:, :, bad, 0] = float("nan")
        v_in[:, :, bad, 1] = float("inf")
    q_in.requires_grad_(), k_in.requires_grad_(), v_in.requires_grad_()
    out = attention(q_in, k_in, v_in, mask=mask, backend=backend)
    assert torch.isnan(out[:, :, bad]).all()  # the last query sees them: its output is NaN, as the equation gives
    ref = attention_ref(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), mask=window_ref(L, L, W, 0))[0]
    torch.testing.assert_close(out[:, :, :bad].double().cpu(), ref[:, :, :bad], atol=TOL[dtype], rtol=TOL[dtype])
    out[:, :, :bad].float().sum().backward()
    for name, t in (("query", q_in), ("key", k_in), ("value", v_in)):
        assert torch.isfinite(t.grad).all(), f"{backend}: a NaN reached the gradient of {name}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", sorted(set(BACKENDS) - {"graph"}))
def test_nan_in_a_padded_query_row_does_not_poison_other_gradients(backend, dtype, gen, device):
    # queries 0..4 see no key (window shifted right past them: keys j <= i - 5), and query 2 holds a NaN
    mask = masks.window(W, 0) & masks.mask_mod(lambda b, h, qi, kv: kv <= qi - 5)
    if backend == "window":
        pytest.skip("the window kernel serves plain bands only (this mask is an And)")
    q, k, v = _qkv(dtype, gen, device)
    with torch.no_grad():
        q[:, :, 2] = float("nan")
    out = attention(q, k, v, mask=mask, backend=backend)
    assert out[:, :, :5].abs().max() == 0
    out.float().sum().backward()
    for name, t in (("query", q), ("key", k), ("value", v)):
        assert torch.isfinite(t.grad).all(), f"{backend}: a NaN reached the gradient of {name}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_half_precision_scores_accumulate_in_float32(backend, dtype, device):
    # q . k = 64 * 40 * 40 = 102400 > 65504 (float16's max) while the scaled score 12800 is representable
    q = torch.full((1, 1, 16, 64), 40.0, dtype=dtype, device=device)
    k = torch.full((1, 1, 16, 64), 40.0, dtype=dtype, device=device)
    v = torch.randn(1, 1, 16, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    mask = _mask_for("graph") if backend == "graph" else masks.window(W, 0)
    if backend == "graph":
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, L - 16)) for t in (q, k, v))
    out = attention(q, k, v, mask=mask, backend=backend)
    assert torch.isfinite(out).all(), backend
    ref = attention_ref(q.cpu(), k.cpu(), v.cpu(), mask=window_ref(q.shape[-2], q.shape[-2], W, 0))[0]
    torch.testing.assert_close(out.double().cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_scale_is_refused(bad):
    # CPU only: an argument check, refused before any kernel runs
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(q, q, q, scale=bad)


@pytest.mark.parametrize("backend", ["auto", "math", "sdpa", "tiled", "chunked"])
def test_empty_batch_and_zero_width_heads(backend, gen, device):
    q = torch.randn(0, 2, 5, 8, device=device)  # empty: nothing drawn
    assert attention(q, q, q, backend=backend).shape == (0, 2, 5, 8)
    q0 = torch.randn(1, 2, 5, 0, device=device)
    v = torch.randn(1, 2, 5, 3, generator=gen)
    out = attention(q0, q0, v.to(device), backend=backend)  # D = 0: every score is 0, so out is the mean of the values
    torch.testing.assert_close(out.cpu(), v.mean(-2, keepdim=True).expand(1, 2, 5, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_the_finite_check_sees_one_bad_entry_anywhere(dtype, bad):
    from attnkit.functional._nonfinite import _all_finite

    x = torch.randn(2, 3, 70, 16).to(dtype).requires_grad_()
    assert _all_finite(x)
    for where in [(0, 0, 0, 0), (1, 2, 69, 15), (1, 0, 33, 7)]:
        y = x.detach().clone()
        y[where] = bad
        assert not _all_finite(y)
    big = torch.full((5,), torch.finfo(dtype).max, dtype=dtype)  # finite extremes are finite
    assert _all_finite(big) and _all_finite(-big)
