"""The banded kernel (masks inside a band, moderate lengths) against the float64 oracle, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from attnkit import masks
from attnkit.functional import attention
from reference import attention_ref, padding_ref, window_ref


@pytest.mark.parametrize("left,right", [(3, 3), (5, 0), (0, 4)])
@pytest.mark.parametrize("L,S", [(61, 61), (40, 70)])
def test_window_and_padding_match_the_oracle_with_gradients(gen, left, right, L, S, device):
    q = torch.randn(3, 2, L, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    k, v = (torch.randn(3, 2, S, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
    lengths = torch.tensor([S, S // 2, 3], device=device)
    mask = masks.window(left, right) & masks.padding(lengths)
    dense = (window_ref(L, S, left, right)[None] & padding_ref(lengths.cpu(), L, S))[:, None]  # (B, 1, L, S)
    out = attention(q, k, v, mask=mask, backend="banded")
    want = attention_ref(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), mask=dense)[0]
    torch.testing.assert_close(out.detach().cpu(), want, atol=1e-12, rtol=0)
    dense = dense.to(device)
    # gradients against PyTorch's SDPA in float64 on the dense mask (rows with no key: zero in both)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    ref = ref.masked_fill(~dense.any(-1, keepdim=True), 0.0)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_auto_picks_it_for_a_band_and_padding_of_a_few_hundred_frames():
    from attnkit.kernels import dispatch
    from attnkit.scores import scaled_dot

    q = torch.zeros(2, 4, 230, 16)
    req = dict(score=scaled_dot, score_mod=None, bias=None, normalize="softmax", scale=None, dropout_p=0.0,
               return_weights=False, return_lse=False)
    band = masks.window(16, 16) & masks.padding(torch.tensor([230, 100]))
    assert dispatch.choose(q, q, q, mask=band, **req) == "banded"
    assert dispatch.choose(q, q, q, mask=masks.documents([100, 130]) & masks.window(8, 0), **req) == "banded"
    assert dispatch.choose(q, q, q, mask=masks.padding(torch.tensor([230, 100])), **req) == "sdpa"  # no band
    with pytest.raises(ValueError, match="band"):
        attention(q, q, q, mask=masks.causal(), backend="banded")
