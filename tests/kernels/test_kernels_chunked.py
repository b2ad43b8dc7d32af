"""Chunked online-softmax kernel (any score, bias, mask) vs float64 references."""

import functools

import pytest
import torch
from _kernel_ref import additive_scores_ref, masked_softmax_attention_ref, softmax_from_scores_ref

from attnkit import masks
from attnkit.functional import scores
from attnkit.kernels.chunked import chunked_attention


def _qkv(B=2, H=2, L=19, S=23, D=6, Dv=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g, dtype=dtype), torch.randn(B, H, S, D, generator=g, dtype=dtype),
            torch.randn(B, H, S, Dv, generator=g, dtype=dtype))


def _to(device, *ts):
    """The CPU-built inputs on ``device`` (references keep computing on the CPU originals)."""
    return tuple(t.to(device) for t in ts)


def _additive_on(device, w_q, w_k, w_v):
    """The additive score with its (CPU-built) weights moved to ``device``."""
    w_q, w_k, w_v = _to(device, w_q, w_k, w_v)
    return functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)


def _close(a, ref, **tol):
    torch.testing.assert_close(a.cpu().double(), ref, **tol)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_dot_with_bias_and_mask(chunk, device):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(1, 2, 19, 23, generator=g)
    m = torch.rand(19, 23, generator=g) < 0.4
    m[4] = False
    out, w = chunked_attention(*_to(device, q, k, v), mask=m.to(device), bias=bias.to(device), chunk_size=chunk,
                               return_weights=True)
    s = (q.double() @ k.double().transpose(-1, -2)) / 6 ** 0.5 + bias.double()
    ref_out, ref_w = softmax_from_scores_ref(s, v, m)
    _close(out, ref_out, rtol=1e-5, atol=1e-5)
    _close(w, ref_w, rtol=1e-5, atol=1e-5)
    assert out[..., 4, :].abs().sum().item() == 0


def test_additive_score_with_structured_mask(device):
    q, k, v = _qkv(L=9, S=11, D=3)
    g = torch.Generator().manual_seed(2)
    w_q, w_k, w_v = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g), torch.randn(7, generator=g)
    score = _additive_on(device, w_q, w_k, w_v)
    mask = masks.window(2, 1) & masks.padding(torch.tensor([11, 6], device=device))
    dense = mask.materialize(9, 11, device="cpu", batch_ndim=2)
    assert dense.any() and not dense.all()
    out = chunked_attention(*_to(device, q, k, v), score=score, mask=mask, chunk_size=4)
    ref, _ = softmax_from_scores_ref(additive_scores_ref(q, k, w_q, w_k, w_v), v, dense)
    _close(out, ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_including_score_parameters(device):
    q, k, v = _to(device, *_qkv(B=1, H=1, L=5, S=7, D=3, Dv=2, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    w_q = torch.randn(4, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w_k = torch.randn(4, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w_v = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    bias = torch.randn(5, 7, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    m = torch.rand(5, 7, generator=g) < 0.6
    m[1] = False
    m = m.to(device)
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v, bias, w_q, w_k, w_v):
        score = functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)
        return chunked_attention(q, k, v, score=score, mask=m, bias=bias, chunk_size=3)

    assert torch.autograd.gradcheck(f, (q, k, v, bias, w_q, w_k, w_v))


def test_gradients_match_reference_dot(device):
    q, k, v = _qkv(dtype=torch.float64)
    m = masks.causal()
    g = torch.randn(2, 2, 19, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fn, dev in ((lambda a, b, c: chunked_attention(a, b, c, mask=m, chunk_size=4), device),
                    (lambda a, b, c: masked_softmax_attention_ref(a, b, c, m.materialize(19, 23))[0], "cpu")):
        ins = [t.to(dev, copy=True).requires_grad_(True) for t in (q, k, v)]
        (fn(*ins) * g.to(dev)).sum().backward()
        grads.append([t.grad.cpu() for t in ins])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_bad_chunk(device):
    q, k, v = _to(device, *_qkv())
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_attention(q, k, v, chunk_size=0)


# ---- additive fast path: projections once, (R, C, hidden) tiles ------------------------------------------------

def _additive_weights(Dq, Dk, hidden=5, dtype=torch.float32, seed=4, grad=False):
    g = torch.Generator().manual_seed(seed)
    ws = (torch.randn(hidden, Dq, generator=g, dtype=dtype), torch.randn(hidden, Dk, generator=g, dtype=dtype),
          torch.randn(hidden, generator=g, dtype=dtype))
    return [w.requires_grad_(grad) for w in ws]


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Additive tiles of 5 x hidden elements: many query blocks and key chunks even on small inputs."""
    import attnkit.kernels.chunked as chunked

    monkeypatch.setattr(chunked, "_ADDITIVE_BUDGET", 5 * 5)


@pytest.mark.parametrize("chunk", [None, 3, 64])
def test_additive_fast_path_row_blocks_match_reference(tiny_tiles, chunk, device):
    """Several query blocks x key chunks, a row-dependent bias and a structured mask; weights too."""
    q, k, v = _qkv(B=2, H=1, L=13, S=11, D=3)
    w_q, w_k, w_v = _additive_weights(3, 3)
    score = _additive_on(device, w_q, w_k, w_v)
    bias = torch.randn(2, 1, 13, 11, generator=torch.Generator().manual_seed(5))
    mask = masks.window(3, 2) & masks.padding(torch.tensor([11, 7], device=device))
    dense = mask.materialize(13, 11, device="cpu", batch_ndim=2)
    assert dense.any() and not dense.all() and not dense.any(-1).all()  # kept, dropped and empty rows
    out, w = chunked_attention(*_to(device, q, k, v), score=score, mask=mask, bias=bias.to(device), chunk_size=chunk,
                               return_weights=True)
    ref_out, ref_w = softmax_from_scores_ref(additive_scores_ref(q, k, w_q, w_k, w_v) + bias.double(), v, dense)
    _close(out, ref_out, rtol=1e-5, atol=1e-5)
    _close(w, ref_w, rtol=1e-5, atol=1e-5)
    assert (out.cpu()[~dense.any(-1)] == 0).all()


def test_additive_fast_path_equals_general_path_and_concat(device):
    """The same scores through the fast path, a plain callable (general path) and the 2-D concat form."""
    q, k, v = _to(device, *_qkv(B=2, H=3, L=17, S=9, D=4, Dv=5))
    w_q, w_k, w_v = _to(device, *_additive_weights(4, 4, hidden=6))
    fast = functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)
    general = lambda a, b: scores.additive(a, b, w_q, w_k, w_v)  # noqa: E731  (not recognized: general path)
    cat = functools.partial(scores.concat, weight=torch.cat([w_q, w_k], dim=1), v=w_v)
    from attnkit.kernels.chunked import _additive_weights as recognize

    assert recognize(fast, q, k) is not None and recognize(cat, q, k) is not None and recognize(general, q, k) is None
    outs = [chunked_attention(q, k, v, score=s, mask=masks.causal()) for s in (fast, general, cat)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-6)


def test_additive_fast_path_bad_weights_raise_the_score_error(device):
    q, k, v = _to(device, *_qkv(L=4, S=5, D=3))
    w_q, w_k, w_v = _to(device, *_additive_weights(3, 2))  # w_k does not fit Dk = 3
    score = functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)
    with pytest.raises(ValueError, match="additive score weights"):
        chunked_attention(q, k, v, score=score)


def test_additive_fast_path_gradcheck_with_row_blocks(tiny_tiles, device):
    q, k, v = _to(device, *_qkv(B=1, H=2, L=6, S=5, D=3, Dv=2, dtype=torch.float64))
    w_q, w_k, w_v = (w.to(device).requires_grad_(True) for w in _additive_weights(3, 3, hidden=4, dtype=torch.float64))
    bias = torch.randn(6, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    bias = bias.to(device).requires_grad_(True)
    m = torch.rand(6, 5, generator=torch.Generator().manual_seed(7)) < 0.6
    m[2] = False
    assert m.any() and not m.all()
    m = m.to(device)
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v, bias, w_q, w_k, w_v):
        score = functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)
        return chunked_attention(q, k, v, score=score, mask=m, bias=bias)

    assert torch.autograd.gradcheck(f, (q, k, v, bias, w_q, w_k, w_v))


def test_additive_fast_path_float64_reference_default_tiles(device):
    """Default tiling on a problem big enough for several query blocks (B x L x S x hidden > 2^20)."""
    q, k, v = _qkv(B=2, H=1, L=70, S=60, D=4, Dv=3)
    w_q, w_k, w_v = _additive_weights(4, 4, hidden=128)
    score = _additive_on(device, w_q, w_k, w_v)
    out = chunked_attention(*_to(device, q, k, v), score=score)
    s = (torch.tanh((q.double() @ w_q.double().T).unsqueeze(-2) + (k.double() @ w_k.double().T).unsqueeze(-3))
         @ w_v.double())  # (B, H, L, S) broadcast in float64
    ref, _ = softmax_from_scores_ref(s, v, None)
    _close(out, ref, rtol=1e-5, atol=1e-5)


def test_additive_reused_buffer_equals_autograd_tiles(tiny_tiles, device):
    """Without autograd the tiles share one buffer (last tiles smaller); the output is the autograd path's."""
    q, k, v = _to(device, *_qkv(B=2, H=1, L=11, S=7, D=3))
    w_q, w_k, w_v = (w.to(device).requires_grad_(True) for w in _additive_weights(3, 3))
    score = functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)
    with torch.no_grad():
        fast = chunked_attention(q, k, v, score=score, chunk_size=3)
    tracked = chunked_attention(q, k, v, score=score, chunk_size=3)
    assert tracked.requires_grad
    torch.testing.assert_close(fast, tracked.detach(), rtol=0, atol=1e-6)
