"""S2Attention / SplitAttention against explicit per-pixel float64 references written here."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn.s2attention import S2Attention, SplitAttention, spatial_shift1, spatial_shift2


def _groups(c):
    """Channel -> quarter index, as the S2-MLPv2 listing splits channels: [0,c//4), [c//4,c//2), ..."""
    bounds = [0, c // 4, c // 2, 3 * c // 4, c]
    return [next(g for g in range(4) if bounds[g] <= ch < bounds[g + 1]) for ch in range(c)]


# (dh, dw) of the source pixel per quarter: out[h, w] = x[h + dh, w + dw] when that pixel exists
SHIFT1 = [(-1, 0), (+1, 0), (0, -1), (0, +1)]
SHIFT2 = [(0, -1), (0, +1), (-1, 0), (+1, 0)]


def ref_shift(x, offsets):
    """Per-pixel loop: each channel's quarter picks its neighbour, border pixels keep their own value."""
    b, h, w, c = x.shape
    out = torch.empty_like(x)
    groups = _groups(c)
    for ch in range(c):
        dh, dw = offsets[groups[ch]]
        for i in range(h):
            for j in range(w):
                si, sj = i + dh, j + dw
                if 0 <= si < h and 0 <= sj < w:
                    out[:, i, j, ch] = x[:, si, sj, ch]
                else:
                    out[:, i, j, ch] = x[:, i, j, ch]
    return out


def ref_split_attention(x_all, w1, w2):
    """float64 plain SplitAttention: x_all (B, K, H, W, C), w1 (C, C), w2 (K*C, C) as nn.Linear weights."""
    x_all = x_all.double()
    b, k, h, w, c = x_all.shape
    out = torch.zeros(b, h, w, c, dtype=torch.float64)
    weights = torch.zeros(b, k, c, dtype=torch.float64)
    for n in range(b):
        # a = sum over branches and pixels
        a = x_all[n].sum(dim=(0, 1, 2))
        z = w1.double() @ a
        z = 0.5 * z * (1 + torch.erf(z / 2**0.5))  # exact GELU
        a_hat = (w2.double() @ z).reshape(k, c)
        for ch in range(c):
            e = torch.exp(a_hat[:, ch] - a_hat[:, ch].max())
            weights[n, :, ch] = e / e.sum()
        for kk in range(k):
            out[n] += weights[n, kk] * x_all[n, kk]
    return out, weights


@pytest.mark.parametrize("c", [1, 3, 6, 30, 64])
@pytest.mark.parametrize("fn,offsets", [(spatial_shift1, SHIFT1), (spatial_shift2, SHIFT2)])
def test_spatial_shift_matches_per_pixel_reference(fn, offsets, c):
    torch.manual_seed(c)
    x = torch.randn(2, 5, 4, c, dtype=torch.float64)
    before = x.clone()
    out = fn(x)
    torch.testing.assert_close(out, ref_shift(x, offsets), rtol=0, atol=0)
    assert torch.equal(x, before), "spatial shift modified its input"


def test_spatial_shift_on_a_single_pixel_image():
    x = torch.randn(1, 1, 1, 8)
    assert torch.equal(spatial_shift1(x), x)
    assert torch.equal(spatial_shift2(x), x)


def test_spatial_shift_moves_a_dot_the_documented_way():
    # one hot pixel in the middle of a 5x5 map, C=4 so every quarter is one channel
    x = torch.zeros(1, 5, 5, 4)
    x[0, 2, 2, :] = 1.0
    out = spatial_shift1(x)
    assert out[0, 3, 2, 0] == 1 and out[0, 2, 2, 0] == 0  # quarter 0 moved down (towards larger h)
    assert out[0, 1, 2, 1] == 1  # quarter 1 moved up
    assert out[0, 2, 3, 2] == 1  # quarter 2 moved right
    assert out[0, 2, 1, 3] == 1  # quarter 3 moved left
    assert out.sum() == 4


@pytest.mark.parametrize("c", [6, 30, 64])
def test_split_attention_matches_reference_and_weights_sum_to_one(c):
    torch.manual_seed(0)
    sa = SplitAttention(c, k=3).double()
    x = torch.randn(2, 3, 4, 5, c, dtype=torch.float64)
    before = x.clone()
    out, weights = sa(x, return_weights=True)
    ref_out, ref_w = ref_split_attention(x, sa.mlp1.weight.detach(), sa.mlp2.weight.detach())
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, ref_w, rtol=1e-10, atol=1e-10)
    assert weights.shape == (2, 3, c)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, c, dtype=torch.float64))
    assert (weights > 0).all()
    assert torch.equal(x, before)
    # the weights are not trivially uniform (a test of the mixing, not only of the normalisation)
    assert (weights - 1 / 3).abs().max() > 1e-3


def test_split_attention_other_branch_counts_and_flat_pixels():
    torch.manual_seed(1)
    sa = SplitAttention(10, k=5)
    x = torch.randn(3, 5, 7, 10)  # (B, K, N, C)
    out, w = sa(x, return_weights=True)
    assert out.shape == (3, 7, 10)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3, 10))
    # identical branches: any convex mix returns the branch itself
    same = torch.randn(2, 1, 4, 10).expand(2, 5, 4, 10)
    torch.testing.assert_close(sa(same), same[:, 0])


def ref_s2attention(x_bchw, m):
    """float64 S2Attention from the listing's equations, with the module's parameters and the loop shifts."""
    x = x_bchw.double().permute(0, 2, 3, 1)
    c = m.channels
    y = x @ m.mlp1.weight.double().T + m.mlp1.bias.double()
    x1 = ref_shift(y[..., :c], SHIFT1)
    x2 = ref_shift(y[..., c : 2 * c], SHIFT2)
    x3 = y[..., 2 * c :]
    a, _ = ref_split_attention(
        torch.stack([x1, x2, x3], 1), m.split_attention.mlp1.weight, m.split_attention.mlp2.weight
    )
    out = a @ m.mlp2.weight.double().T + m.mlp2.bias.double()
    return out.permute(0, 3, 1, 2)


@pytest.mark.parametrize("c", [6, 30, 64])
def test_s2attention_matches_reference_for_any_channel_count(c):
    torch.manual_seed(c)
    m = S2Attention(c)
    x = torch.randn(2, c, 5, 6)
    before = x.clone()
    out = m(x)
    assert out.shape == (2, c, 5, 6)
    assert torch.equal(x, before), "S2Attention modified its input"
    torch.testing.assert_close(out.double(), ref_s2attention(x, m), rtol=1e-4, atol=1e-5)


def test_s2attention_channels_last_equals_channels_first():
    torch.manual_seed(0)
    first = S2Attention(12)
    last = S2Attention(12, channels_last=True)
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, 12, 4, 3)
    torch.testing.assert_close(last(x.permute(0, 2, 3, 1)), first(x).permute(0, 2, 3, 1))


def test_s2attention_gradients_reach_the_input():
    m = S2Attention(8).double()
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="channels"):
        S2Attention(0)
    with pytest.raises(ValueError, match="k must be"):
        SplitAttention(4, k=0)
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\) with C = channels = 8"):
        S2Attention(8)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="K = k = 3"):
        SplitAttention(4)(torch.randn(1, 2, 5, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        spatial_shift1([[1.0]])


def test_in_place_listing_shift_is_not_a_shift_but_ours_is():
    # the seed listing's first line of spatial_shift1, run in place: it reads rows it already overwrote
    x = torch.arange(6.0).reshape(1, 6, 1, 1).expand(1, 6, 1, 8).contiguous()
    listing = x.clone()
    listing[:, 1:, :, :2] = listing[:, :5, :, :2]
    ours = spatial_shift1(x)
    torch.testing.assert_close(ours[0, :, 0, 0], torch.tensor([0.0, 0, 1, 2, 3, 4]))
    # whatever the in-place copy produced, it must not be taken as the reference
    if not torch.equal(listing[0, :, 0, 0], ours[0, :, 0, 0]):
        assert listing[0, :, 0, 0].unique().numel() < 5  # smeared
