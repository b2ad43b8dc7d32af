"""attention(..., backend=...) routes structured masks to the fast kernels, validates explicit names, and every
kernel agrees with the float64 reference through the public contract."""

import functools

import pytest
import torch
from _kernel_ref import band_mask, masked_softmax_attention_ref

from attnkit import masks
from attnkit.functional import scores
from attnkit.functional.attention import attention
from attnkit.kernels import _native, dispatch


def _qkv(B=2, H=2, L=24, S=24, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (L, S, S))


def _to(device, *ts):
    """The CPU-built inputs on ``device`` (references keep computing on the CPU originals)."""
    return tuple(t.to(device) for t in ts)


def _close(a, ref, **tol):
    torch.testing.assert_close(a.cpu().double(), ref, **tol)


def _graph_mask(N, E, seed):
    g = torch.Generator().manual_seed(seed)
    ei = torch.stack([torch.randint(0, N, (E,), generator=g), torch.randint(0, N - 1, (E,), generator=g)])
    return masks.graph(ei, num_nodes=N)


CASES = {
    "window": lambda L, S: masks.window(3, 2),
    "blocksparse": lambda L, S: masks.window(3, 0) | masks.dense(torch.rand(L, S) < 0.1),
    "graph": lambda L, S: _graph_mask(L, 60, 1),
    "chunked": lambda L, S: masks.causal() & masks.padding(torch.tensor([S, S - 5])),
}


@pytest.mark.parametrize("backend", sorted(CASES))
def test_explicit_backend_matches_reference_and_returns_weights(backend, device):
    torch.manual_seed(0)
    q, k, v = _qkv()
    mask = CASES[backend](24, 24)  # its tensors stay on the CPU, as a user builds them: the kernels move them
    dense = mask.materialize(24, 24, batch_ndim=2)
    assert dense.any() and not dense.all()
    dq, dk, dv = _to(device, q, k, v)
    out, w = attention(dq, dk, dv, mask=mask, backend=backend, return_weights=True)
    ref_out, ref_w = masked_softmax_attention_ref(q, k, v, dense)
    _close(out, ref_out, rtol=1e-5, atol=1e-5)
    _close(w, ref_w, rtol=1e-5, atol=1e-5)
    # asking for the picture never changes the output
    torch.testing.assert_close(attention(dq, dk, dv, mask=mask, backend=backend), out)


@pytest.mark.parametrize("backend", sorted(CASES))
def test_explicit_backend_gradcheck(backend, device):
    q, k, v = (t.to(device).requires_grad_(True) for t in _qkv(B=1, H=1, L=9, S=9, D=3, dtype=torch.float64))
    mask = {"graph": _graph_mask(9, 20, 2), "chunked": masks.causal() & masks.padding(torch.tensor([6]))}.get(
        backend, CASES[backend](9, 9))
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, mask=mask, backend=backend), (q, k, v))


def test_auto_routes_by_structure():
    # CPU only: a pure routing decision (nothing is computed), and dispatch does not look at the device
    q, k, v = _qkv(B=1, H=1, L=2048, S=2048, D=4)
    req = dict(score=scores.scaled_dot, bias=None, normalize="softmax", dropout_p=0.0, return_weights=False)
    built = _native.available()  # the compiled kernel takes sparse CPU masks where it is built
    assert dispatch.choose(q, k, v, mask=masks.window(8, 8), **req) == ("native" if built else "window")
    assert dispatch.choose(q, k, v, mask=masks.window(8, 0) | masks.window(0, 8), **req) == (
        "native" if built else "blocksparse")
    assert dispatch.choose(q, k, v, mask=masks.window(None, 8), **req) == "sdpa"  # half the tiles: dense wins
    assert dispatch.choose(q, k, v, mask=masks.causal(), **req) == "sdpa"
    assert dispatch.choose(q, k, v, mask=None, **req) == "sdpa"
    assert dispatch.choose(q, k, v, mask=_graph_mask(2048, 3000, 3), **req) == "graph"
    assert dispatch.choose(q, k, v, mask=masks.window(1000, 1000), **req) == "sdpa"
    add = functools.partial(scores.additive, w_q=torch.randn(5, 4), w_k=torch.randn(5, 4), w_v=torch.randn(5))
    assert dispatch.choose(q, k, v, mask=None, **{**req, "score": add}) == "chunked"


def test_auto_window_equals_band_reference(device):
    q, k, v = _qkv(B=1, H=2, L=300, S=280, D=4)
    out = attention(*_to(device, q, k, v), mask=masks.window(5, 1))
    ref, _ = masked_softmax_attention_ref(q, k, v, band_mask(300, 280, 5, 1))
    _close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "backend,kwargs,why",
    [("window", dict(mask=masks.causal()), "both widths finite"),
     ("window", dict(mask=masks.window(2, 2), bias=torch.zeros(24, 24)), "bias"),
     ("graph", dict(mask=masks.window(2, 2)), "graph mask"),
     ("blocksparse", dict(mask=None), "no mask"),
     ("blocksparse", dict(mask=masks.window(2, 2), normalize="relu"), "softmax"),
     ("window", dict(mask=masks.window(2, 2), dropout_p=0.1), "dropout"),
     ("chunked", dict(normalize="sigmoid"), "softmax"),
     ("nope", dict(), "one of")],
)
def test_explicit_backend_that_cannot_serve_raises(backend, kwargs, why):
    # CPU only: argument checks, refused before any kernel runs
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=why):
        attention(q, k, v, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", sorted(CASES))
@pytest.mark.parametrize("L,S", [(0, 5), (5, 0), (0, 0)])
def test_empty_queries_or_keys(backend, L, S, device):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=g).to(device).requires_grad_(True)
               for n, d in ((L, 4), (S, 4), (S, 3)))
    mask = {"window": masks.window(1, 1), "blocksparse": masks.window(1, 0) | masks.window(0, 1),
            "graph": masks.graph(torch.zeros(2, 0, dtype=torch.long), num_nodes=L),
            "chunked": masks.causal()}[backend]
    if backend == "graph" and L != S:
        return  # a graph mask has one node set
    out, w = attention(q, k, v, mask=mask, backend=backend, return_weights=True)
    assert out.shape == (1, 2, L, 3) and w.shape == (1, 2, L, S)
    assert out.abs().sum().item() == 0
    out.sum().backward()
    assert q.grad is None or q.grad.abs().sum().item() == 0


def test_sdpa_remembers_a_reused_mask_and_follows_in_place_edits(monkeypatch, device):
    """A mask object reused across calls is materialized once for the SDPA path; editing a mask's tensor in place
    (here a padding length) is seen by the next call."""
    q0, k0, v0 = _qkv(L=12, S=12)
    q, k, v = _to(device, q0, k0, v0)
    win = masks.window(2, 5)
    calls = []
    real = masks.Window.materialize

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(masks.Window, "materialize", counting)
    first = attention(q, k, v, mask=win, backend="sdpa")
    second = attention(q, k, v, mask=win, backend="sdpa")
    assert len(calls) == 1 and torch.equal(first, second)
    ref = masked_softmax_attention_ref(q0, k0, v0, band_mask(12, 12, 2, 5))[0]
    _close(first, ref, rtol=1e-5, atol=1e-5)

    import attnkit.kernels.sdpa as sdpa_mod

    monkeypatch.setattr(sdpa_mod, "_CACHE_MAX", 100)  # larger masks are rebuilt each call, not kept alive
    big = masks.window(2, 5)
    attention(q, k, v, mask=big, backend="sdpa")
    attention(q, k, v, mask=big, backend="sdpa")
    assert len(calls) == 3
    lengths = torch.tensor([12, 7], device=device)
    pad = masks.padding(lengths)
    attention(q, k, v, mask=pad, backend="sdpa")
    lengths[1] = 4  # in place: the remembered mask must be rebuilt
    out = attention(q, k, v, mask=pad, backend="sdpa")
    t = torch.arange(12) < lengths.cpu().view(2, 1, 1, 1)  # (B, 1, 1, S)
    _close(out, masked_softmax_attention_ref(q0, k0, v0, t)[0], rtol=1e-5, atol=1e-5)
