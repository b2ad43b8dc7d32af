"""Block-sparse kernel: tile plans (empty / partial / fully kept tiles), plan caching, and agreement with the
float64 masked-softmax reference, forward, weights and gradients."""

import pytest
import torch
from _kernel_ref import masked_softmax_attention_ref

from attnkit import masks
from attnkit.kernels.blocksparse import blocksparse_attention, run_plan, weights_from_lse


def _qkv(B=2, H=3, L=40, S=40, D=8, Dv=5, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype) * scale
    k = torch.randn(B, H, S, D, generator=g, dtype=dtype) * scale
    v = torch.randn(B, H, S, Dv, generator=g, dtype=dtype)
    return q, k, v


def _tiled(L, S, block, full, partial, seed=0):
    """(L, S) mask: tiles in ``full`` all True, tiles in ``partial`` half True at random, the rest False."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(L, S, dtype=torch.bool)
    for i, j in full:
        m[i * block : (i + 1) * block, j * block : (j + 1) * block] = True
    for i, j in partial:
        r = torch.rand(min(block, L - i * block), min(block, S - j * block), generator=g) < 0.5
        m[i * block : i * block + r.shape[0], j * block : j * block + r.shape[1]] = r
    return m


def _to(device, *ts):
    """The CPU-built inputs on ``device`` (references keep computing on the CPU originals)."""
    return tuple(t.to(device) for t in ts)


def _leaves(device, *ts):
    """Fresh leaf copies on ``device`` (a copy even on the CPU, so gradients of two runs never share a tensor)."""
    return [t.to(device, copy=True).requires_grad_(True) for t in ts]


def _close(a, ref, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a.cpu().double(), ref, rtol=rtol, atol=atol)


def test_plan_keeps_full_tiles_unmasked_and_masks_partial_ones(device):
    m = _tiled(64, 64, 16, full=[(0, 0), (0, 2), (1, 1), (3, 3)], partial=[(1, 3), (2, 0)])
    plan = masks.dense(m.to(device)).plan(64, 64, 16, batch_ndim=2, device=device)
    assert plan.pairs == 6 * 16 * 16  # every non-empty tile once, no empty tile
    tiles = {}  # (query block, key block) -> partial?
    for grp in plan.groups:
        assert grp.allowed is None
        c = grp.kidx.shape[1] // 16
        part = set(zip(grp.part_g.tolist(), grp.part_t.tolist(), strict=True))
        for r, qb in enumerate(grp.qblocks.tolist()):
            for t in range(c):
                tiles[(qb, int(grp.kidx[r, t * 16]) // 16)] = (r, t) in part
        assert grp.forbid.shape[0] == len(part)
    assert tiles == {(0, 0): False, (0, 2): False, (1, 1): False, (3, 3): False, (1, 3): True, (2, 0): True}


def _bounds(n, size, device):
    lo = torch.arange(0, n, size, device=device)
    return lo, torch.clamp(lo + size, max=n) - 1


def test_and_of_masks_drops_tiles_without_an_allowed_pair(device):
    L = S = 32
    a = torch.zeros(L, S, dtype=torch.bool)
    b = torch.zeros(L, S, dtype=torch.bool)
    a[:8, :8] = True  # tile (0, 0): a holds its top-left quarter, b its bottom-right: a & b is empty there
    b[8:16, 8:16] = True
    a[16:, 16:] = True
    b[16:, 16:] = True
    mask = masks.dense(a.to(device)) & masks.dense(b.to(device))
    # each part's tile (0, 0) is partial, so And cannot classify it from the parts: it is evaluated, and empty
    assert int(mask.tile_states(*_bounds(L, 16, device), *_bounds(S, 16, device), L, S)[0, 0]) == masks.PARTIAL
    assert not bool(mask.block_mask(L, S, 16, device=device)[0, 0])
    plan = mask.plan(L, S, 16, batch_ndim=2, device=device)
    assert plan.pairs == 16 * 16  # only tile (1, 1) is computed
    q, k, v = _qkv(L=L, S=S)
    out = run_plan(*_to(device, q, k, v), plan)
    _close(out, masked_softmax_attention_ref(q, k, v, a & b)[0])
    assert out[..., :16, :].abs().max().item() == 0


@pytest.mark.parametrize("block", [8, 16])
def test_full_partial_and_empty_tiles_match_reference_with_gradients(block, device):
    L, S = 45, 38  # ragged last blocks
    m = _tiled(L, S, block, full=[(0, 0), (1, 1), (1, 2), (2, 0)], partial=[(0, 2), (2, 1), (L // block, 0)],
               seed=3)
    m[5] = False  # a fully masked row inside a live block
    assert m.any() and not m.all()
    q, k, v = _qkv(L=L, S=S, dtype=torch.float64, scale=2.0)
    g = torch.randn(2, 3, L, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for fn, dev in ((lambda a, b, c: blocksparse_attention(a, b, c, m.to(device), block=block, return_weights=True),
                     device),
                    (lambda a, b, c: masked_softmax_attention_ref(a, b, c, m), "cpu")):
        ins = _leaves(dev, q, k, v)
        out, w = fn(*ins)
        (out * g.to(dev)).sum().backward()
        results.append((out.detach().cpu(), w.detach().cpu(), [t.grad.cpu() for t in ins]))
    (out, w, grads), (ref_out, ref_w, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert out[..., 5, :].abs().sum() == 0 and grads[0][..., 5, :].abs().sum() == 0


def test_gradcheck_with_full_and_partial_tiles_and_batched_padding(device):
    L = S = 12
    m = _tiled(L, S, 4, full=[(0, 0), (1, 1), (2, 2), (2, 0)], partial=[(0, 2), (1, 0)], seed=4)
    # (B,) lengths: batched partial tiles
    mask = masks.dense(m.to(device)) & masks.padding(torch.tensor([10, 5], device=device))
    q, k, v = _qkv(B=2, H=1, L=L, S=S, D=3, Dv=2, dtype=torch.float64, seed=5)
    dense = mask.materialize(L, S, device="cpu", batch_ndim=2)
    ref = masked_softmax_attention_ref(q, k, v, dense)[0]
    q, k, v = _to(device, q, k, v)
    _close(blocksparse_attention(q, k, v, mask, block=4), ref)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: blocksparse_attention(a, b, c, mask, block=4), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b: blocksparse_attention(a, b, v, mask, block=4, return_weights=True)[1], (q, k))


def test_weights_for_chosen_rows_equal_the_full_weights(device):
    L = S = 48
    m = _tiled(L, S, 16, full=[(0, 0), (2, 1)], partial=[(1, 2), (2, 2)], seed=6)
    q, k, v = _qkv(L=L, S=S)
    plan = masks.dense(m.to(device)).plan(L, S, 16, batch_ndim=2, device=device)
    dq, dk, dv = _to(device, q, k, v)
    _, w = run_plan(dq, dk, dv, plan, return_weights=True)
    # lse_i = log sum_j exp(s_ij) over the allowed keys (rows without any: -inf), in float64 on the CPU
    s = (q.double() @ k.double().transpose(-1, -2) * 8**-0.5).masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, -1).float().to(device)
    rows = torch.tensor([1, 17, 40, 47], device=device)
    got = weights_from_lse(dq, dk, lse, plan, 8**-0.5, rows=rows)
    torch.testing.assert_close(got.cpu(), w[..., rows, :].cpu())


def test_plan_is_cached_per_mask_and_rebuilt_when_the_mask_changes(device):
    L = S = 32
    q, k, v = _qkv(L=L, S=S)
    dq, dk, dv = _to(device, q, k, v)
    t = torch.zeros(L, S, dtype=torch.bool)
    t[:, :8] = True
    m = masks.dense(t)
    p1 = m.plan(L, S, 8, batch_ndim=2)
    assert m.plan(L, S, 8, batch_ndim=2) is p1  # same mask, same shape: reused
    assert m.plan(L, S, 16, batch_ndim=2) is not p1  # another block size: rebuilt
    # an in-place edit of the (CPU) tensor: the cached plan (on the inputs' device) must not be reused
    blocksparse_attention(dq, dk, dv, m, block=8)
    t[:, 20:] = True
    _close(blocksparse_attention(dq, dk, dv, m, block=8), masked_softmax_attention_ref(q, k, v, t)[0])
    # the tensor replaced by another one
    t2 = torch.zeros(L, S, dtype=torch.bool)
    t2[:, 30:] = True
    m.tensor = t2
    _close(blocksparse_attention(dq, dk, dv, m, block=8), masked_softmax_attention_ref(q, k, v, t2)[0])
    # a structured mask whose parameters change
    w = masks.window(2, 0)
    blocksparse_attention(dq, dk, dv, w, block=8)
    w.left = 5
    band = torch.ones(L, S, dtype=torch.bool).tril().triu(-5)
    _close(blocksparse_attention(dq, dk, dv, w, block=8), masked_softmax_attention_ref(q, k, v, band)[0])


def test_low_precision_large_scores_stay_finite(device):
    L = S = 40
    m = _tiled(L, S, 8, full=[(0, 0), (1, 1), (4, 2)], partial=[(2, 2), (3, 0)], seed=7)
    q, k, v = _qkv(L=L, S=S, dtype=torch.bfloat16, scale=300.0)
    out = blocksparse_attention(*_to(device, q, k, v, m), block=8)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    _close(out, masked_softmax_attention_ref(q, k, v, m)[0], rtol=2e-2, atol=2e-2)


def test_inference_path_equals_the_autograd_path(device):
    L = S = 48
    m = _tiled(L, S, 16, full=[(0, 0), (1, 1), (2, 0), (2, 2)], partial=[(1, 2)], seed=8)
    q, k, v = _qkv(L=L, S=S)
    dq, dk, dv, dm = _to(device, q, k, v, m)
    with torch.no_grad():  # no log-sum-exp: unmasked groups take the fused softmax
        fast = blocksparse_attention(dq, dk, dv, dm, block=16)
    grad = blocksparse_attention(dq.clone().requires_grad_(True), dk, dv, dm, block=16)
    torch.testing.assert_close(fast, grad.detach(), rtol=1e-6, atol=1e-6)
    _close(fast, masked_softmax_attention_ref(q, k, v, m)[0])


def test_mask_with_no_allowed_pair_gives_zeros_and_zero_gradients(device):
    q = torch.randn(1, 2, 20, 4, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)
    m = torch.zeros(20, 20, dtype=torch.bool, device=device)
    out, w = blocksparse_attention(q, q, q, m, block=8, return_weights=True)
    assert out.abs().sum().item() == 0 and w.abs().sum().item() == 0
    out.sum().backward()
    assert q.grad.abs().sum().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whole_tile_groups_run_on_the_fused_kernel_and_match_the_reference(monkeypatch, dtype):
    """Groups of fully kept tiles (values as wide as queries) go through PyTorch's fused CPU kernel; it must give
    what the float64 reference and the batched-matmul path give, gradients included, with a ragged last query
    block and one group that still has a partial tile.

    CPU only, on purpose: the fused op is ``aten._scaled_dot_product_flash_attention_for_cpu`` and the kernel
    takes it for CPU inputs alone; on CUDA the batched-matmul path runs, which the device-parametrized tests
    above and the property tests cover."""
    import attnkit.kernels.blocksparse as bs

    L, S, block = 44, 48, 8  # S a whole number of tiles, L not
    m = _tiled(L, S, block, full=[(0, 0), (0, 3), (1, 1), (2, 2), (2, 5), (3, 0), (5, 4)], partial=[(4, 1)],
               seed=6)
    q, k, v = _qkv(L=L, S=S, D=6, Dv=6, dtype=dtype, scale=1.5, seed=7)
    g = torch.randn(2, 3, L, 6, dtype=dtype)
    calls = []
    flash = bs._FLASH

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return flash(*args, **kwargs)

    def run():
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, w = blocksparse_attention(*ins, m, block=block, return_weights=True)
        (out * g).sum().backward()
        return out, w, [t.grad for t in ins]

    monkeypatch.setattr(bs, "_FLASH", counting)
    fused = run()
    assert calls, "no group took the fused kernel"
    monkeypatch.setattr(bs, "_FLASH", None)
    plain = run()
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_w = masked_softmax_attention_ref(*ins, m)
    (ref_out * g).sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for got in (fused, plain):
        _close(got[0], ref_out.detach(), **tol)
        _close(got[1], ref_w.detach(), **tol)
        for a, b in zip(got[2], [t.grad for t in ins], strict=True):
            _close(a, b.double(), rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    if dtype == torch.float64:
        monkeypatch.setattr(bs, "_FLASH", flash)
        small = [t[:1, :1].clone().requires_grad_(True) for t in (q, k, v)]
        assert torch.autograd.gradcheck(lambda a, b, c: blocksparse_attention(a, b, c, m, block=block), small)


@pytest.mark.parametrize("strided", [False, True])
def test_fused_steps_with_strided_inputs_and_an_empty_query_block(strided, device):
    """The fused path copies whole key tiles when keys and values are row-major and falls back to a row gather
    when they are strided views; either way outputs and gradients match the reference, and a query block with no
    tile gets zero output and zero gradient (inference and training)."""
    L = S = 40
    block = 8
    m = _tiled(L, S, block, full=[(0, 0), (0, 2), (1, 2), (1, 4), (3, 1), (4, 0), (4, 2)], partial=[])  # block 2: none
    q, k, v = _qkv(L=L, S=S, D=6, Dv=6, scale=1.5, seed=3)
    gen = torch.Generator().manual_seed(4)
    if strided:  # the first half of a wider tensor's features: rows with gaps between them
        k = torch.cat([k, torch.randn(k.shape, generator=gen)], -1)
        v = torch.cat([v, torch.randn(v.shape, generator=gen)], -1)
    dq, dk, dv = _to(device, q, k, v)
    if strided:  # the views are taken on the device, so the kernel sees strided inputs there too
        k, v, dk, dv = k[..., :6], v[..., :6], dk[..., :6], dv[..., :6]
        assert dk.stride(-2) != dk.shape[-1]
    dm = m.to(device)
    ins = _leaves(device, dq, dk, dv)  # copies (row-major, as clone() made them); the strided views run below
    out = blocksparse_attention(*ins, dm, block=block)
    g = torch.randn(out.shape, generator=gen)
    (out * g.to(device)).sum().backward()
    ref_ins = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_out, _ = masked_softmax_attention_ref(*ref_ins, m)
    (ref_out * g.double()).sum().backward()
    _close(out, ref_out.detach())
    with torch.no_grad():
        _close(blocksparse_attention(dq, dk, dv, dm, block=block), ref_out.detach())
    for a, b in zip(ins, ref_ins, strict=True):
        _close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    out, gq = out.cpu(), ins[0].grad.cpu()
    assert torch.equal(out[..., 16:24, :], torch.zeros_like(out[..., 16:24, :]))
    assert torch.equal(gq[..., 16:24, :], torch.zeros_like(gq[..., 16:24, :]))
