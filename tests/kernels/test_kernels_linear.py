"""Linear attention kernel and LinearAttention module vs the float64 loop reference (tests/kernels/_kernel_ref.py)."""

import pytest
import torch
from _kernel_ref import linear_attention_ref

from attnkit.kernels.linear import linear_attention, linear_attention_step
from attnkit.nn.linear_attention import LinearAttention


def _qkv(B=2, H=3, L=37, S=37, D=5, Dv=7, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype) * scale
    k = torch.randn(B, H, S, D, generator=g, dtype=dtype) * scale
    v = torch.randn(B, H, S, Dv, generator=g, dtype=dtype)
    return q, k, v


def _to(device, *ts):
    """The CPU-built inputs on ``device`` (references keep computing on the CPU originals)."""
    return tuple(t.to(device) for t in ts)


def _close(a, ref, **tol):
    torch.testing.assert_close(a.cpu().double(), ref, **tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_matches_float64_reference(causal, chunk, device):
    q, k, v = _qkv()
    out = linear_attention(*_to(device, q, k, v), causal=causal, chunk_size=chunk)
    ref = linear_attention_ref(q, k, v, causal=causal)
    assert out.dtype == torch.float32 and out.device.type == device.type
    _close(out, ref, rtol=1e-5, atol=1e-5)


def test_non_causal_cross_lengths(device):
    q, k, v = _qkv(L=5, S=19)
    _close(linear_attention(*_to(device, q, k, v)), linear_attention_ref(q, k, v, causal=False), rtol=1e-5, atol=1e-5)


def test_causal_is_causal_through_gradients(device):
    q, k, v = _to(device, *_qkv(B=1, H=1, L=20, S=20, dtype=torch.float64))
    k.requires_grad_(True)
    out = linear_attention(q, k, v, causal=True, chunk_size=6)
    out[0, 0, 7].sum().backward()
    assert k.grad[0, 0, 8:].abs().max().item() == 0
    assert k.grad[0, 0, :8].abs().min().item() > 0


def test_recurrent_equals_parallel(device):
    q, k, v = _to(device, *_qkv(B=2, H=2, L=50, S=50, D=4, Dv=6))
    par = linear_attention(q, k, v, causal=True, chunk_size=16)
    state, outs = None, []
    for t in range(q.shape[-2]):
        y, state = linear_attention_step(q[..., t, :], k[..., t, :], v[..., t, :], state)
        outs.append(y)
    rec = torch.stack(outs, dim=-2)
    torch.testing.assert_close(rec, par, rtol=1e-5, atol=1e-5)
    assert state[0].shape == (2, 2, 4, 6) and state[1].shape == (2, 2, 4)


def test_long_sequence_large_norms_stay_finite_and_accurate(device):
    # the normalizer grows with L and with |q|,|k|: float32 accumulation must keep it accurate
    q, k, v = _qkv(B=1, H=1, L=4096, S=4096, D=8, Dv=4, scale=30.0, seed=3)
    out = linear_attention(*_to(device, q, k, v), causal=True, chunk_size=64).cpu()  # on the device under test
    assert torch.isfinite(out).all()
    # the float64 reference and the plain float32 computation below run on the CPU
    ref = linear_attention(q.double(), k.double(), v.double(), causal=True, chunk_size=64)
    # independent spot check of the float64 path on a few rows with the loop reference
    rows = [0, 1, 2047, 4095]
    for i in rows:
        r = linear_attention_ref(q[..., : i + 1, :], k[..., : i + 1, :], v[..., : i + 1, :], causal=True)[..., i, :]
        torch.testing.assert_close(ref[..., i, :], r, rtol=1e-9, atol=1e-9)
    # FlashAttention's rule: no worse than twice the plain float32 computation (sim = phi(Q) phi(K)^T, tril)
    pq, pk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    sim = (pq @ pk.transpose(-1, -2)).tril()
    plain = (sim @ v) / (sim.sum(-1, keepdim=True) + 1e-6)
    err_fast = (out.double() - ref).abs().max()
    err_plain = (plain.double() - ref).abs().max()
    assert err_fast <= 2 * err_plain + 1e-6, (err_fast, err_plain)
    # outputs are convex combinations of v: inside [min v, max v]
    assert (out <= v.max(-2, keepdim=True).values + 1e-5).all()
    assert (out >= v.min(-2, keepdim=True).values - 1e-5).all()


def test_half_inputs_accumulate_in_float32(device):
    q, k, v = _qkv(L=300, S=300, dtype=torch.bfloat16)
    out = linear_attention(*_to(device, q, k, v), causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = linear_attention_ref(q, k, v, causal=True)
    _close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal, device):
    q, k, v = _to(device, *_qkv(B=1, H=2, L=6, S=6, D=3, Dv=2, dtype=torch.float64))
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: linear_attention(a, b, c, causal=causal, chunk_size=4), (q, k, v)
    )


def test_bad_input(device):
    q, k, v = _to(device, *_qkv(L=4, S=6))
    with pytest.raises(ValueError, match="L == S"):
        linear_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="eps"):
        linear_attention(q, k, v, eps=0.0)
    with pytest.raises(TypeError, match="dtype"):
        linear_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="last dim"):
        linear_attention(q, k[..., :2], v)


def _module_reference(m: LinearAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    B, L, E = x.shape
    H, D = m.num_heads, m.head_dim
    x = x.double()

    def proj(lin):
        return (x @ lin.weight.double().T + lin.bias.double()).view(B, L, H, D).transpose(1, 2)

    o = linear_attention_ref(proj(m.q_proj), proj(m.k_proj), proj(m.v_proj), causal=causal)
    o = o.transpose(1, 2).reshape(B, L, E)
    return o @ m.out_proj.weight.double().T + m.out_proj.bias.double()


@pytest.mark.parametrize("causal", [False, True])
def test_module_forward_matches_reference(causal, device):
    torch.manual_seed(0)
    m = LinearAttention(12, 3, causal=causal)
    x = torch.randn(2, 9, 12)
    ref = _module_reference(m, x, causal)  # on the CPU, before the module moves
    _close(m.to(device)(x.to(device)), ref, rtol=1e-5, atol=1e-5)


def test_module_step_equals_forward(device):
    torch.manual_seed(1)
    m = LinearAttention(16, 4, causal=True).to(device)
    x = torch.randn(3, 40, 16).to(device)
    par = m(x)
    state, ys = None, []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), par, rtol=1e-5, atol=1e-5)


def test_module_errors():
    # CPU only: argument checks, refused before any kernel runs
    with pytest.raises(ValueError, match="divide"):
        LinearAttention(10, 3)
    m = LinearAttention(8, 2)
    with pytest.raises(ValueError, match="causal"):
        m.step(torch.randn(1, 8))
    with pytest.raises(ValueError, match="E=8"):
        m(torch.randn(1, 3, 7))
