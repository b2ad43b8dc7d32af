"""Window and block-sparse kernels vs the float64 masked-softmax reference and an explicit band mask."""

import pytest
import torch
from _kernel_ref import band_mask, masked_softmax_attention_ref

from attnkit import masks
from attnkit.kernels.blocksparse import blocksparse_attention
from attnkit.kernels.window import window_attention


def _qkv(B=2, H=3, L=37, S=37, D=8, Dv=5, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype) * scale
    k = torch.randn(B, H, S, D, generator=g, dtype=dtype) * scale
    v = torch.randn(B, H, S, Dv, generator=g, dtype=dtype)
    return q, k, v


def _to(device, *ts):
    """The CPU-built inputs on ``device`` (references keep computing on the CPU originals)."""
    return tuple(t.to(device) for t in ts)


def _close(a, ref, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a.cpu().double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "L,S,left,right,block",
    [(37, 37, 0, 0, 8), (37, 37, 1, 0, 8), (37, 37, 0, 1, 16), (37, 37, 5, 3, 64),
     (20, 45, 1, 1, 8), (45, 20, 4, 0, 8), (45, 20, 1, 2, 7), (1, 17, 3, 0, 4), (17, 1, 2, 2, 4)],
)
def test_window_matches_explicit_band(L, S, left, right, block, device):
    q, k, v = _qkv(L=L, S=S, scale=2.0)
    band = band_mask(L, S, left, right)
    assert band.any() and not band.all()
    out, w = window_attention(*_to(device, q, k, v), left=left, right=right, block=block, return_weights=True)
    ref_out, ref_w = masked_softmax_attention_ref(q, k, v, band)
    _close(out, ref_out)
    _close(w, ref_w)
    # rows whose band misses every key (L > S) are exactly zero
    empty = ~band.any(-1)
    assert out.cpu()[..., empty, :].abs().sum() == 0


def test_window_gradcheck_float64(device):
    q, k, v = _to(device, *_qkv(B=1, H=2, L=11, S=9, D=3, Dv=2, dtype=torch.float64))
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: window_attention(a, b, c, left=2, right=1, block=4), (q, k, v))
    # the rebuilt weights carry exact gradients too
    assert torch.autograd.gradcheck(
        lambda a, b: window_attention(a, b, v, left=1, right=0, block=4, return_weights=True)[1], (q, k)
    )


def test_window_gradients_match_reference_and_empty_rows_are_finite(device):
    q, k, v = _qkv(B=1, H=2, L=30, S=12, D=4, Dv=3, dtype=torch.float64)
    band = band_mask(30, 12, 2, 0)
    assert not band.any(-1).all()  # some rows see nothing
    g = torch.randn(1, 2, 30, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fn, dev in ((lambda a, b, c: window_attention(a, b, c, left=2, right=0, block=8), device),
                    (lambda a, b, c: masked_softmax_attention_ref(a, b, c, band)[0], "cpu")):
        ins = [t.to(dev, copy=True).requires_grad_(True) for t in (q, k, v)]
        (fn(*ins) * g.to(dev)).sum().backward()
        grads.append([t.grad.cpu() for t in ins])
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_window_half_precision_and_large_scores(device):
    q, k, v = _qkv(L=40, S=40, dtype=torch.bfloat16, scale=300.0)
    out = window_attention(*_to(device, q, k, v), left=3, right=3, block=8)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref, _ = masked_softmax_attention_ref(q, k, v, band_mask(40, 40, 3, 3))
    _close(out, ref, rtol=2e-2, atol=2e-2)


def test_window_broadcast_batch_and_noncontiguous(device):
    qkv = torch.randn(2, 3, 25, 3 * 8, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.split(8, dim=-1)  # non-contiguous chunks of a packed tensor
    k1, v1 = k[:, :1], v[:, :1]  # one key/value head shared by 3 query heads (MQA broadcast)
    dq, dk, dv = qkv.to(device).split(8, dim=-1)  # the same non-contiguous views on the device
    out = window_attention(dq, dk[:, :1], dv[:, :1], left=2, right=2, block=8)
    ref, _ = masked_softmax_attention_ref(q, k1, v1, band_mask(25, 25, 2, 2))
    _close(out, ref)


def test_window_bad_input(device):
    q, k, v = _to(device, *_qkv())
    with pytest.raises(ValueError, match="left and right"):
        window_attention(q, k, v, left=-1, right=0)
    with pytest.raises(TypeError, match="left"):
        window_attention(q, k, v, left=1.5, right=0)
    with pytest.raises(TypeError, match="dtype"):
        window_attention(q, k.double(), v, left=1, right=1)


def _random_mask(L, S, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(L, S, generator=g) < p


@pytest.mark.parametrize("block", [4, 16])
def test_blocksparse_dense_random_mask(block, device):
    L, S = 45, 38
    q, k, v = _qkv(L=L, S=S, scale=2.0)
    m = _random_mask(L, S, 0.2, 1)
    m[3] = False  # a fully masked row
    out, w = blocksparse_attention(*_to(device, q, k, v, m), block=block, return_weights=True)
    ref_out, ref_w = masked_softmax_attention_ref(q, k, v, m)
    _close(out, ref_out)
    _close(w, ref_w)
    assert out[..., 3, :].abs().sum().item() == 0


def test_blocksparse_structured_trees_and_padding(device):
    L = S = 40
    q, k, v = _qkv(L=L, S=S)
    lengths = torch.tensor([30, 11], device=device)  # the mask's own tensors live where the inputs do
    tree = (masks.window(4, 0) | masks.dense(_random_mask(L, S, 0.05, 2).to(device))) & masks.padding(lengths)
    dense = tree.materialize(L, S, device="cpu", batch_ndim=2)  # (B, 1, L, S)
    assert dense.any() and not dense.all()
    out = blocksparse_attention(*_to(device, q, k, v), tree, block=8)
    ref, _ = masked_softmax_attention_ref(q, k, v, dense)
    _close(out, ref)
    out_c = blocksparse_attention(*_to(device, q, k, v), masks.causal(), block=8)
    _close(out_c, masked_softmax_attention_ref(q, k, v, torch.ones(L, S, dtype=torch.bool).tril())[0])


def test_blocksparse_gradcheck_float64(device):
    L, S = 13, 10
    q, k, v = _to(device, *_qkv(B=1, H=2, L=L, S=S, D=3, Dv=2, dtype=torch.float64))
    m = _random_mask(L, S, 0.3, 3)
    m[0] = False
    m = m.to(device)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: blocksparse_attention(a, b, c, m, block=4), (q, k, v))


def test_blocksparse_skips_empty_tiles(device):
    tiles = torch.zeros(8, 8, dtype=torch.bool)
    tiles[torch.arange(8), (torch.arange(8) * 3) % 8] = True
    m = tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)  # (128, 128), 1/8 of the tiles
    plan = masks.dense(m.to(device)).plan(128, 128, 16, device=device)
    assert plan.pairs == 128 * 16  # one 16-key tile per query row, not 128 keys


def test_blocksparse_sees_in_place_edits_of_a_dense_mask(device):
    L = S = 32
    q, k, v = _qkv(L=L, S=S)
    dq, dk, dv = _to(device, q, k, v)
    t = torch.zeros(L, S, dtype=torch.bool)
    t[:, :8] = True
    m = masks.dense(t)  # the user's CPU tensor, edited in place below (the kernel moves it to the device)
    blocksparse_attention(dq, dk, dv, m, block=8)  # plans (and caches) tiles for the first 8 keys
    t[:, 20:] = True  # the mask changes in place: the cached tiles must not be reused
    out = blocksparse_attention(dq, dk, dv, m, block=8)
    _close(out, masked_softmax_attention_ref(q, k, v, t)[0])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_window_nonfinite_key_outside_band_does_not_leak(bad, device):
    # key 30 lies in the tiles of rows 24..39 (block 8) but only rows 28..32 may attend to it: its +-inf / NaN
    # score must reach those rows only (masking a key equals deleting it), forward and backward
    L = S = 64
    q, k, v = _qkv(B=1, H=2, L=L, S=S, D=4, Dv=3, dtype=torch.float64)
    sees = band_mask(L, S, 2, 2)[:, 30]  # (L,) rows whose band holds key 30
    assert sees.any() and not sees.all()
    near = band_mask(L, S, 2, 2)[sees].any(0)  # (S,) keys sharing a row with key 30
    g = torch.randn(1, 2, L, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    runs = []
    for val in (bad, 0.0):
        k2 = k.clone()
        k2[..., 30, :] = val
        ins = [t.to(device, copy=True).requires_grad_(True) for t in (q, k2, v)]
        out = window_attention(*ins, left=2, right=2, block=8)
        (out.nan_to_num(0.0) * g).sum().backward()
        runs.append((out.detach().cpu(), ins[1].grad.cpu(), ins[2].grad.cpu()))
    (out_bad, dk_bad, dv_bad), (out_ok, dk_ok, dv_ok) = runs
    assert torch.isfinite(out_bad[..., ~sees, :]).all()
    torch.testing.assert_close(out_bad[..., ~sees, :], out_ok[..., ~sees, :], rtol=1e-12, atol=1e-12)
    for a, b in ((dk_bad, dk_ok), (dv_bad, dv_ok)):
        assert torch.isfinite(a[..., ~near, :]).all()
        torch.testing.assert_close(a[..., ~near, :], b[..., ~near, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save_p", [True, False])  # backward from the forward's P, or recomputing it
@pytest.mark.parametrize("budget", [1, 8 * 24, 1 << 20])  # one tile per step, a few tiles, everything at once
@pytest.mark.parametrize("L,S,left,right", [(70, 70, 5, 3), (61, 77, 9, 0), (77, 61, 0, 6), (64, 64, 16, 16)])
def test_window_steps_and_ends_match_reference_with_gradients(monkeypatch, budget, save_p, L, S, left, right,
                                                              device):
    # interior blocks (strided key views), padded blocks at both ends and step boundaries all agree with the
    # float64 reference, output and gradients
    import attnkit.kernels.window as win

    monkeypatch.setattr(win, "_BUDGET", budget)
    monkeypatch.setattr(win, "_SAVE_P_BYTES", win._SAVE_P_BYTES if save_p else 0)
    q, k, v = _qkv(B=2, H=2, L=L, S=S, D=4, Dv=3, dtype=torch.float64, scale=2.0)
    band = band_mask(L, S, left, right)
    assert band.any() and not band.all()
    g = torch.randn(2, 2, L, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fn, dev in ((lambda a, b, c: window_attention(a, b, c, left=left, right=right, block=8), device),
                    (lambda a, b, c: masked_softmax_attention_ref(a, b, c, band)[0], "cpu")):
        ins = [t.to(dev, copy=True).requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        (out * g.to(dev)).sum().backward()
        grads.append([out.detach().cpu()] + [t.grad.cpu() for t in ins])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_window_no_grad_forward_equals_grad_forward_float32(device):
    q, k, v = _qkv(B=1, H=3, L=200, S=200, D=16, Dv=16)
    dq, dk, dv = _to(device, q, k, v)
    with torch.no_grad():
        a = window_attention(dq, dk, dv, left=20, right=20, block=16)
    b = window_attention(dq.requires_grad_(True), dk, dv, left=20, right=20, block=16)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    _close(a, masked_softmax_attention_ref(q, k, v, band_mask(200, 200, 20, 20))[0])
