"""The compiled CPU tile kernel (backend "native"): agreement with the float64 oracle and SDPA on every kind of
sparse mask, gradcheck in float64, fully masked rows, half precision, the plan's batch dims, and the fallback
to the pure-PyTorch kernels where no compiler exists (one notice, same results)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _kernel_ref import masked_softmax_attention_ref
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import masks
from attnkit.functional import attention
from attnkit.kernels import _native, native
from reference import attention_ref, causal_ref, random_mask, window_ref

built = pytest.mark.skipif(not _native.available(), reason=f"the native kernel is not built here: "
                                                          f"{_native._state.get('reason')}")


def _qkv(B=2, H=3, L=150, S=150, D=16, Dv=None, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, H, S, D, generator=g).to(dtype)
    v = torch.randn(B, H, S, Dv or D, generator=g).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _docs_ref(lengths, L):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return (ids[:, None] == ids[None, :]) & causal_ref(L, L)


def _gapped(b, h, qi, kv):
    """A +-100 window with holes at the ends of tiles far from the diagonal: a row's allowed keys in a run's
    first (last) tile are one interval that stops short of the tile's end (starts after its start), or two."""
    far_left = (kv % 64 >= 40) & (kv < qi - 64)
    far_right = (kv % 64 < 20) & (kv > qi + 64)
    return ((qi - kv).abs() <= 100) & ~far_left & ~far_right


def _cases(L, S):
    """(attnkit mask, dense float64-reference mask) pairs: window, causal window, block sparse, packed documents,
    a mask_mod, a per-head random mask."""
    g = torch.Generator().manual_seed(7)
    tiles = random_mask((-(-L // 64), -(-S // 64)), g, 0.3)
    blocks = tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)[:L, :S]
    per_head = random_mask((1, 3, L, S), g, 0.2)
    out = {
        "window": (masks.window(20, 9), window_ref(L, S, 20, 9)),
        "causal-window": (masks.window(40, 0), window_ref(L, S, 40, 0)),
        "blocksparse": (masks.dense(blocks), blocks),
        "mask_mod": (masks.mask_mod(lambda b, h, qi, kv: (qi - kv).abs() <= 33), window_ref(L, S, 33, 33)
                     if L == S else None),
        "random-per-head": (masks.dense(per_head), per_head),
        "gapped": (masks.mask_mod(_gapped), _gapped(None, None, torch.arange(L)[:, None], torch.arange(S))),
    }
    if L == S:
        docs = [L // 4, L // 2, L - L // 4 - L // 2]
        out["documents"] = (masks.documents(docs) & masks.causal(), _docs_ref(docs, L))
    return {k: v for k, v in out.items() if v[1] is not None}


@built
@pytest.mark.parametrize("L,S", [(150, 150), (97, 203), (203, 64)])
@pytest.mark.parametrize("kind", ["window", "causal-window", "blocksparse", "mask_mod", "random-per-head",
                                  "documents", "gapped"])
def test_forward_lse_and_gradients_match_the_float64_reference(kind, L, S):
    cases = _cases(L, S)
    if kind not in cases:
        pytest.skip("this mask is defined for L == S only")
    mask, dense = cases[kind]
    q, k, v = _qkv(L=L, S=S, Dv=12, grad=True)
    out, lse = attention(q, k, v, mask=mask, backend="native", return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = masked_softmax_attention_ref(q64, k64, v64, dense)  # float64, differentiable
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    if L == S:  # the house oracle (row by row, slow): the same forward
        torch.testing.assert_close(out.double(), attention_ref(q, k, v, mask=dense)[0], atol=2e-5, rtol=2e-5)
    s = (q.double() @ k.double().transpose(-1, -2) / 4.0).masked_fill(~dense, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, b in zip(grads, refs, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@built
def test_agrees_with_sdpa_on_a_dense_boolean_mask():
    q, k, v = _qkv(B=1, H=4, L=300, S=300, D=32, seed=3)
    mask = masks.window(50, 10) | masks.window(None, 0) & masks.mask_mod(lambda b, h, qi, kv: kv % 7 == 0)
    dense = mask.materialize(300, 300)
    out = attention(q, k, v, mask=mask, backend="native")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense), atol=1e-5, rtol=1e-5)


@built
@pytest.mark.parametrize("D,Dv", [(16, 8), (8, 24), (64, 64), (12, 40), (5, 12)])
@pytest.mark.parametrize("kind", ["window", "gapped", "blocksparse", "documents"])
def test_register_tiles_match_the_reference_for_every_head_size(kind, D, Dv):
    """float32 runs QK^T and P V on register tiles (6 rows; keys packed in panels of 16 per chunk of 8 query
    blocks; values by 16 and 8 columns, Dv % 8 == 0, else MKL): head sizes on both sides of those widths,
    two chunks (L = 600: 10 blocks), a last block of 24 rows."""
    L = 600
    i, j = torch.arange(L)[:, None], torch.arange(L)
    if kind == "window":
        mask, dense = masks.window(20, 9), (j >= i - 20) & (j <= i + 9)
    elif kind == "gapped":
        mask, dense = masks.mask_mod(_gapped), _gapped(None, None, i, j)
    elif kind == "blocksparse":
        tiles = random_mask((10, 10), torch.Generator().manual_seed(5), 0.3)
        dense = tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)[:L, :L]
        mask = masks.dense(dense)
    else:
        docs = [150, 300, 150]
        ids = torch.repeat_interleave(torch.arange(3), torch.tensor(docs))
        mask, dense = masks.documents(docs) & masks.causal(), (ids[:, None] == ids[None, :]) & (j <= i)
    q, k, v = _qkv(B=1, H=2, L=L, S=L, D=D, Dv=Dv, seed=D + Dv, grad=True)
    out, lse = attention(q, k, v, mask=mask, backend="native", return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = masked_softmax_attention_ref(q64, k64, v64, dense)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    s = (q.double() @ k.double().transpose(-1, -2) / D ** 0.5).masked_fill(~dense, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q64, k64, v64), g.double()),
                         strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5)


@built
@pytest.mark.parametrize("kind", ["window", "blocksparse", "random-per-head"])
def test_gradcheck_float64(kind):
    L = S = 70  # two 64-row tiles: a full one and a cut one
    mask = _cases(L, S)[kind][0]
    q, k, v = _qkv(B=1, H=3, L=L, S=S, D=4, Dv=3, dtype=torch.float64, seed=1, grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, mask=mask, backend="native"), (q, k, v),
                                    fast_mode=True)  # random projections of the Jacobian: seconds, not a minute


@built
def test_fully_masked_rows_give_zeros_lse_minus_inf_and_zero_gradients():
    # queries 0..4 see no key, and neither does the whole second 64-row tile of head 1
    L = 140
    keep = window_ref(L, L, 6, 0) & (torch.arange(L)[None, :] <= torch.arange(L)[:, None] - 5)
    keep = keep.expand(1, 2, L, L).clone()
    keep[0, 1, 64:128] = False
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        q, k, v = _qkv(B=1, H=2, L=L, S=L, D=8, dtype=dtype, grad=True)
        out, lse = attention(q, k, v, mask=masks.dense(keep), backend="native", return_lse=True)
        empty = ~keep.any(-1)  # (1, 2, L)
        assert out[empty].abs().max() == 0 and torch.isneginf(lse[empty]).all()
        assert torch.isfinite(out).all() and torch.isfinite(lse[~empty]).all()
        out.float().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        assert q.grad[empty].abs().max() == 0


@built
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)], ids=str)
def test_half_inputs_accumulate_in_float32(dtype, tol):
    q, k, v = _qkv(L=200, S=200, dtype=dtype, grad=True)
    q.data.mul_(30)  # q . k far above 65504 in float16 is fine once accumulated in float32
    mask = masks.window(30, 30)
    out = attention(q, k, v, mask=mask, backend="native")
    assert out.dtype == dtype
    ref, _ = attention_ref(q, k, v, mask=window_ref(200, 200, 30, 30))
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad).all()


@built
def test_weights_lse_and_broadcast_batch_dims():
    q, _, _ = _qkv(B=2, H=3, L=90, S=90, D=8)
    k, v = _qkv(B=1, H=1, L=90, S=90, D=8, seed=2)[1:]  # keys and values broadcast over the batch and heads
    mask = masks.window(12, 3)
    out, w, lse = attention(q, k, v, mask=mask, backend="native", return_weights=True, return_lse=True)
    ref, wref = attention_ref(q, k.expand_as(q), v.expand_as(q), mask=window_ref(90, 90, 12, 3))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.double(), wref, atol=1e-5, rtol=1e-5)
    assert lse.shape == (2, 3, 90)


@built
@pytest.mark.parametrize("L,S", [(0, 5), (5, 0), (1, 1), (2, 77)])
def test_tiny_and_empty_problems(L, S):
    q, k, v = _qkv(B=1, H=2, L=L, S=S, D=4, grad=True)
    mask = masks.window(3, 3)
    out = attention(q, k, v, mask=mask, backend="native")
    ref = attention_ref(q, k, v, mask=window_ref(L, S, 3, 3))[0] if L * S else torch.zeros(1, 2, L, 4)
    torch.testing.assert_close(out.double(), ref.double(), atol=1e-6, rtol=1e-6)
    out.sum().backward()


@built
def test_auto_picks_it_for_sparse_masks_on_the_cpu():
    from attnkit import scores
    from attnkit.kernels import dispatch

    q = torch.zeros(1, 2, 1024, 16)
    req = dict(score=scores.scaled_dot, score_mod=None, bias=None, normalize="softmax", scale=None, dropout_p=0.0,
               return_weights=False, return_lse=False)
    assert dispatch.choose(q, q, q, mask=masks.window(64, 64), **req) == "native"
    assert dispatch.choose(q, q, q, mask=masks.causal(), **req) == "sdpa"  # half the tiles and more: dense
    assert dispatch.choose(q, q, q, mask=masks.window(64, 64), **{**req, "score_mod": lambda s, *i: s}) == "tiled"


@built
@pytest.mark.parametrize("pool_mb", [None, "0"])
def test_outputs_reused_from_the_buffer_cache_never_alias_live_results(pool_mb):
    """The kernel's outputs of 1 MiB or more come from a cache of freed buffers (ATTNKIT_NATIVE_POOL_MB, 0 = off):
    a result that is still alive is never handed out again, and a reused buffer holds the new result."""
    script = textwrap.dedent("""
        import torch
        from attnkit import masks
        from attnkit.functional import attention
        g = torch.Generator().manual_seed(0)
        m = masks.window(16, 16)
        def inputs():
            return [torch.randn(1, 4, 1024, 64, generator=g).requires_grad_() for _ in range(3)]
        def ref(q, k, v):
            s = (q @ k.transpose(-1, -2) / 8).masked_fill(~m.materialize(1024, 1024), float("-inf"))
            return torch.softmax(s.double(), -1) @ v.double()
        a, b = inputs(), inputs()
        out_a = attention(*a, mask=m, backend="native")  # 1 MiB: pooled
        out_b = attention(*b, mask=m, backend="native")
        grads_a = torch.autograd.grad(out_a, a, torch.ones_like(out_a))
        grads_b = torch.autograd.grad(out_b, b, torch.ones_like(out_b))
        ptrs = {t.data_ptr() for t in (out_a, out_b, *grads_a, *grads_b)}
        errs = [float((out_a.double() - ref(*a)).abs().max()), float((out_b.double() - ref(*b)).abs().max())]
        freed = {t.data_ptr() for t in (out_a, *grads_a)}
        del out_a, grads_a
        c = inputs()
        out_c = attention(*c, mask=m, backend="native")
        errs.append(float((out_c.double() - ref(*c)).abs().max()))
        print(len(ptrs), int(out_c.data_ptr() in freed), max(errs))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(native.__file__).parents[2]))
    env.pop("ATTNKIT_NATIVE_POOL_MB", None)
    if pool_mb is not None:
        env["ATTNKIT_NATIVE_POOL_MB"] = pool_mb
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    distinct, reused, err = res.stdout.split()
    assert int(distinct) == 8  # two live outputs and their six gradients: eight buffers
    assert err and float(err) < 1e-5
    if pool_mb is None:  # a freed buffer serves the next call (with the cache off, malloc may or may not reuse one)
        assert int(reused) == 1


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_forward_reports_a_nan_or_inf_in_exactly_the_rows_it_reads(dtype):
    """check_finite: None for a non-finite entry in a query row of a block with tiles or a key/value row of a tile
    in the plan; a result where it sits only in rows the plan never reads (keys 256.. of a causal 0..127 block
    sparse mask; the queries of block 1, which has no tiles)."""
    tiles = torch.zeros(4, 4, dtype=torch.bool)
    tiles[0, 0] = tiles[2, :2] = tiles[3, 3] = True  # 64 x 64 tiles; query block 1 reads nothing, key tile 2 unread
    dense = tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)
    mask = masks.dense(dense)
    plan = native.plan_for(mask, torch.zeros(1, 1, 256, 8), torch.zeros(1, 1, 256, 8))
    for which, row, read in [("q", 10, True), ("q", 70, False), ("q", 130, True), ("k", 100, True),
                             ("k", 150, False), ("v", 140, False), ("v", 200, True), ("k", 255, True)]:
        for bad in (float("nan"), float("inf"), float("-inf")):
            q, k, v = _qkv(B=1, H=2, L=256, S=256, D=8, dtype=dtype)
            {"q": q, "k": k, "v": v}[which][0, 1, row, 3] = bad
            res = native.native_attention(q, k, v, plan, check_finite=True)
            assert (res is None) == read, (which, row, bad)
            if not read:  # the rows never read change nothing: the same result as with them zeroed
                for t in (q, k, v):
                    t.nan_to_num_(0.0, 0.0, 0.0)
                out, _ = native.native_attention(q, k, v, plan)
                torch.testing.assert_close(res[0], out, rtol=0, atol=0)


@pytest.mark.parametrize("raw", ["abc", "-5", "1.5", ""])
def test_a_bad_output_cache_size_is_a_clear_error(monkeypatch, raw):
    monkeypatch.setenv("ATTNKIT_NATIVE_POOL_MB", raw)
    with pytest.raises(ValueError, match=r"ATTNKIT_NATIVE_POOL_MB must be a whole number of MiB.*got"):
        _native.extension()
    monkeypatch.setenv("ATTNKIT_NATIVE_POOL_MB", " 64 ")
    _native.extension()  # whole MiB: fine


def test_plan_arrays_list_each_block_s_tiles_and_partial_masks():
    mask = masks.window(70, 0)  # 64-row tiles: diagonal partial, the one left of it partial, others full
    plan = mask.plan(200, 200, 64, batch_ndim=2)
    ptr, col, part, forbid, span, first = native._csr(plan, (1, 1))
    dense = window_ref(200, 200, 70, 0)
    assert ptr.tolist() == [0, 1, 3, 6, 9]  # block b sees keys 64 b - 70 .. 64 b + 63
    assert col.tolist() == [0, 0, 1, 0, 1, 2, 1, 2, 3]
    assert first.tolist() == [True, False, True, False, False, True, False, False, True]  # each tile's first use
    for b in range(4):
        tiles = col[ptr[b]:ptr[b + 1]].tolist()
        for t, p in zip(tiles, part[ptr[b]:ptr[b + 1]].tolist(), strict=True):
            sub = dense[b * 64:(b + 1) * 64, t * 64:(t + 1) * 64]
            assert (p < 0) == (bool(sub.all()) and sub.shape == (64, 64))
            if p >= 0:
                r, c = sub.shape
                assert torch.equal(~forbid[p, 0, :r, :c], sub)
                lo, hi = span[p, 0, :r].unbind(-1)  # a window's rows: one interval each
                assert (lo >= 0).all()
                for i in range(r):
                    allowed = torch.zeros(64, dtype=torch.bool)
                    allowed[lo[i]:hi[i]] = True
                    assert torch.equal(allowed[:c], sub[i])


def test_plan_spans_mark_tiles_whose_rows_are_not_one_interval():
    forbid = torch.ones(3, 1, 4, 8, dtype=torch.bool)
    forbid[0, 0, :, 2:5] = False  # every row [2, 5)
    forbid[1, 0, 0, 1:3] = False  # row 0 [1, 3), row 1 none, row 2 [0, 8), row 3 two pieces: not an interval tile
    forbid[1, 0, 2] = False
    forbid[1, 0, 3, [0, 5]] = False
    forbid[2, 0, 1, 7] = False  # rows with none and one with [7, 8)
    span = native._spans(forbid)
    assert span.dtype == torch.int32 and span.shape == (3, 1, 4, 2)
    assert span[0, 0].tolist() == [[2, 5]] * 4
    assert (span[1, 0, :, 0] == -1).all()
    assert span[2, 0].tolist() == [[8, 0], [7, 8], [8, 0], [8, 0]]


def test_without_a_compiler_it_says_so_once_and_runs_the_pure_pytorch_kernels(tmp_path):
    script = textwrap.dedent("""
        import warnings, torch
        from attnkit import masks
        from attnkit.functional import attention
        from attnkit.kernels import _native, dispatch, native
        from attnkit.scores import scaled_dot
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 2, 600, 8, generator=g) for _ in range(3))
            m = masks.window(20, 20)
            out = attention(q, k, v, mask=m, backend="native")
            out2 = attention(q, k, v, mask=m)
            req = dict(score=scaled_dot, score_mod=None, bias=None, normalize="softmax", scale=None,
                       dropout_p=0.0, return_weights=False, return_lse=False)
            chosen = dispatch.choose(q, k, v, mask=m, **req)
        notices = [str(w.message) for w in caught if "compiled CPU kernel" in str(w.message)]
        s = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~m.materialize(600, 600), float("-inf"))
        ref = torch.softmax(s.double(), -1) @ v.double()
        print(len(notices), chosen, float((out.double() - ref).abs().max()), float((out2.double() - ref).abs().max()))
        print(notices[0] if notices else "")
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), PATH="/nonexistent",
               ATTNKIT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(Path(native.__file__).parents[2]))
    env.pop("ATTNKIT_NATIVE", None)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    count, chosen, err, err_auto = res.stdout.split("\n")[0].split()
    assert int(count) == 1 and chosen == "window"
    assert float(err) < 1e-5 and float(err_auto) < 1e-5
    assert "no C++ compiler" in res.stdout and "pure-PyTorch" in res.stdout
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


@built
@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 140), S=st.integers(1, 140), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_random_masks_match_the_reference(L, S, p, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 1, L, S, generator=g) < p  # per batch element, shared by the heads
    q, k, v = _qkv(B=2, H=2, L=L, S=S, D=8, Dv=4, seed=seed, grad=True)
    out, lse = attention(q, k, v, mask=masks.dense(keep), backend="native", return_lse=True)
    ref, _ = masked_softmax_attention_ref(q, k, v, keep)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[~keep.expand(2, 2, L, S).any(-1)]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---- the fused ALiBi (attnkit.scores.alibi) ------------------------------------------------------------------

def _alibi_ref(q, k, v, slopes, allowed):
    """float64 softmax(scale q k^T + slope_h (j - i)) v over ``allowed`` (L, S), from the equations."""
    L, S = q.shape[-2], k.shape[-2]
    rel = (torch.arange(S)[None, :] - torch.arange(L)[:, None]).double()  # (L, S): j - i
    bias = slopes.double()[:, None, None] * rel  # (H, L, S)
    return masked_softmax_attention_ref(q.double(), k.double(), v.double(), allowed, bias=bias)


@built
@pytest.mark.parametrize("kind", ["causal", "window", "none"])
def test_fused_alibi_matches_the_float64_equations_and_the_tiled_kernel(kind):
    from attnkit.scores import alibi

    L = S = 200
    q, k, v = _qkv(B=2, H=4, L=L, S=S, dtype=torch.float32, seed=3, grad=True)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    mask = {"causal": masks.causal(), "window": masks.window(30, 10), "none": None}[kind]
    allowed = {"causal": causal_ref(L, S), "window": window_ref(L, S, 30, 10),
               "none": torch.ones(L, S, dtype=torch.bool)}[kind]
    mod = alibi(slopes)
    from attnkit.kernels import dispatch
    from attnkit.scores import scaled_dot

    req = dict(score=scaled_dot, score_mod=mod, mask=mask, bias=None, normalize="softmax", scale=None,
               dropout_p=0.0, return_weights=False, return_lse=False)
    assert dispatch.choose(q, k, v, **req) == "native"
    g = torch.randn(2, 4, L, 16, generator=torch.Generator().manual_seed(9))
    out, lse = attention(q, k, v, score_mod=mod, mask=mask, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want, _ = _alibi_ref(q.detach(), k.detach(), v.detach(), slopes, allowed)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    # the same score_mod called per tile by the pure-PyTorch tiled kernel: forward, lse and gradients
    ref, ref_lse = attention(q, k, v, score_mod=mod, mask=mask, return_lse=True, backend="tiled")
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@built
def test_fused_alibi_gradcheck_float64_and_where_it_steps_aside():
    from attnkit.scores import alibi

    q, k, v = _qkv(B=1, H=2, L=70, S=70, D=4, dtype=torch.float64, seed=5, grad=True)
    mod = alibi(torch.tensor([0.3, 0.05], dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(a, b, c, score_mod=mod, mask=masks.causal(), backend="native"), (q, k, v),
        fast_mode=True)
    # learnable slopes and weights go to the tiled kernel (they need what the fused loop does not give)
    learn = alibi(torch.tensor([0.3, 0.05], dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="learnable slopes"):
        attention(q, k, v, score_mod=learn, mask=masks.causal(), backend="native")
    with pytest.raises(ValueError, match="weights"):
        attention(q, k, v, score_mod=mod, mask=masks.causal(), backend="native", return_weights=True)
    with pytest.raises(ValueError, match="only the built-in score_mod"):
        attention(q, k, v, score_mod=lambda s, b, h, i, j: s, mask=masks.causal(), backend="native")
    out = attention(q, k, v, score_mod=learn, mask=masks.causal())  # auto: tiled, with the slopes' gradient
    (gs,) = torch.autograd.grad(out.sum(), (learn.slopes,))
    assert torch.isfinite(gs).all() and gs.abs().sum() > 0
