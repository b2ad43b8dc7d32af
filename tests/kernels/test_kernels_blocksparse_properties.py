"""Property tests (hypothesis) for the block-sparse kernel: random tile layouts (fully kept, partial and empty
tiles), lengths that are not multiples of the block, key/value inputs that are strided views, batch dims that
broadcast, float32 and float64. Output, weights and gradients must equal the float64 plain reference, through the
fused path (PyTorch's CPU attention op on whole tiles) and the batched-matmul path alike."""

from __future__ import annotations

import pytest
import torch
from _kernel_ref import masked_softmax_attention_ref
from hypothesis import given
from hypothesis import strategies as st

import attnkit.kernels.blocksparse as bs
from attnkit import masks

# hypothesis does not mix with function-scoped fixtures, so the device is a parametrize with conftest's skip
_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


@st.composite
def problems(draw):
    block = draw(st.sampled_from([2, 4, 8]))
    nbq, nbk = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    L = nbq * block - draw(st.integers(0, block - 1))  # a ragged last query block
    S = nbk * block - draw(st.sampled_from([0, 0, block - 1]))  # mostly whole tiles, so the fused path runs
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 3, (nbq, nbk), generator=g)  # 0 empty, 1 partial, 2 fully kept tile
    dense = torch.rand(L, S, generator=g) < 0.5
    tile = kind.repeat_interleave(block, 0).repeat_interleave(block, 1)[:L, :S]
    mask = (tile == 2) | ((tile == 1) & dense)  # (L, S)
    batch = draw(st.sampled_from([(1,), (2,), (2, 3)]))
    D = draw(st.sampled_from([3, 4]))
    return {
        "block": block, "L": L, "S": S, "mask": mask, "batch": batch, "D": D, "seed": seed,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "strided": draw(st.booleans()), "key_batch_1": draw(st.booleans()),
    }


def _inputs(p, device="cpu"):
    """q, k, v drawn on the CPU and moved to ``device`` before the strided views are taken (``.to`` of a view
    with gaps would return a contiguous copy)."""
    g = torch.Generator().manual_seed(p["seed"] + 1)
    B, D, dt = p["batch"], p["D"], p["dtype"]
    q = torch.randn(*B, p["L"], D, generator=g, dtype=dt) * 1.5
    kb = (*B[:-1], 1) if p["key_batch_1"] else B  # keys shared along the last batch dim: broadcast
    k = torch.randn(*kb, p["S"], 2 * D, generator=g, dtype=dt) * 1.5
    v = torch.randn(*kb, p["S"], 2 * D, generator=g, dtype=dt)
    q, k, v = q.to(device), k.to(device), v.to(device)
    if p["strided"]:  # the first D features of wider tensors: rows with gaps between them
        k, v = k[..., :D], v[..., :D]
    else:
        k, v = k[..., :D].contiguous(), v[..., :D].contiguous()
    return q, k, v


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("fused", [True, False])  # on CUDA both take the batched-matmul path (the op is CPU's)
@given(p=problems())
def test_blocksparse_matches_reference_with_gradients(fused, device, p):
    q, k, v = _inputs(p)  # for the reference
    dq, dk, dv = _inputs(p, device)  # the same values on the device, the strided views strided there too
    dm = p["mask"].to(device)
    flash = bs._FLASH
    bs._FLASH = flash if fused else None  # None: every group takes the batched-matmul path
    try:
        ins = [t.clone().requires_grad_(True) for t in (dq, dk, dv)]
        out, w = bs.blocksparse_attention(*ins, masks.dense(dm), block=p["block"], return_weights=True)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(p["seed"] + 2), dtype=out.dtype)
        (out * g.to(device)).sum().backward()
        with torch.no_grad():  # inference: no log-sum-exp, the fused softmax on unmasked groups
            inf = bs.blocksparse_attention(dq, dk, dv, masks.dense(dm), block=p["block"])
    finally:
        bs._FLASH = flash
    out, w, inf = out.detach().cpu(), w.cpu(), inf.cpu()
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_w = masked_softmax_attention_ref(*refs, p["mask"])
    (ref_out * g.double()).sum().backward()
    tol = {"rtol": 1e-4, "atol": 1e-5} if p["dtype"] == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(out.double(), ref_out.detach(), **tol)
    torch.testing.assert_close(inf.double(), ref_out.detach(), **tol)
    torch.testing.assert_close(w.double(), ref_w.detach().expand(w.shape), **tol)
    for got, ref in zip(ins, refs, strict=True):
        torch.testing.assert_close(got.grad.cpu().double(), ref.grad, **tol)
    empty = ~p["mask"].any(-1)  # query rows with no allowed key: zero output
    assert torch.equal(out[..., empty, :], torch.zeros_like(out[..., empty, :]))
