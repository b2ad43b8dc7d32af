"""Positional modules: values against the papers' formulas (plain loops here) and a published example."""

import cmath
import math

import pytest
import torch

from attnkit import masks
from attnkit.functional.attention import attention
from attnkit.nn.positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)


def ref_sinusoidal(positions, d_model):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    return torch.tensor(
        [[(math.sin if dim % 2 == 0 else math.cos)(pos / 10000 ** (2 * (dim // 2) / d_model))
          for dim in range(d_model)] for pos in positions],
        dtype=torch.float64,
    )


# ---- SinusoidalPositionalEncoding ------------------------------------------------------------------------


def test_sinusoidal_module_adds_paper_table():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    pe = SinusoidalPositionalEncoding(10, max_len=50)
    torch.testing.assert_close(pe(x), x + ref_sinusoidal(range(6), 10), rtol=0, atol=1e-7)
    torch.testing.assert_close(pe(x, offset=44), x + ref_sinusoidal(range(44, 50), 10), rtol=0, atol=1e-7)


def test_sinusoidal_module_past_max_len_computes_on_the_fly():
    x = torch.zeros(1, 12, 8)
    pe = SinusoidalPositionalEncoding(8, max_len=5)
    torch.testing.assert_close(pe(x)[0].double(), ref_sinusoidal(range(12), 8), rtol=0, atol=1e-6)
    torch.testing.assert_close(pe(x, offset=3)[0].double(), ref_sinusoidal(range(3, 15), 8), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3), (torch.float64, 1e-12)])
def test_sinusoidal_module_other_dtypes(dtype, atol):
    pe = SinusoidalPositionalEncoding(8, max_len=30)  # float32 cache
    out = pe(torch.zeros(1, 30, 8, dtype=dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out[0].double(), ref_sinusoidal(range(30), 8), rtol=0, atol=atol)


def test_sinusoidal_module_dropout_and_state_dict():
    pe = SinusoidalPositionalEncoding(16, max_len=20, dropout=0.5)
    assert pe.state_dict() == {}  # the table is a non-persistent buffer
    x = torch.ones(4, 20, 16)
    pe.eval()
    ref = pe(x)
    pe.train()
    torch.manual_seed(0)
    out = pe(x)
    dropped = (out == 0).float().mean().item()
    assert 0.4 < dropped < 0.6
    torch.testing.assert_close(out[out != 0], 2 * ref[out != 0])


# ---- LearnedPositionalEmbedding -----------------------------------------------------------------------------


def test_learned_embedding_adds_rows_and_trains_only_used_rows():
    torch.manual_seed(0)
    emb = LearnedPositionalEmbedding(max_len=8, embed_dim=4)
    x = torch.randn(3, 5, 4)
    out = emb(x, offset=2)
    torch.testing.assert_close(out, x + emb.weight.detach()[2:7])
    out.sum().backward()
    touched = emb.weight.grad.abs().sum(-1) > 0
    assert touched.tolist() == [False, False, True, True, True, True, True, False]
    assert 0.005 < emb.weight.detach().std().item() < 0.05  # N(0, 0.02^2) initialisation


def test_learned_embedding_refuses_positions_past_max_len():
    emb = LearnedPositionalEmbedding(max_len=4, embed_dim=2)
    with pytest.raises(ValueError, match="max_len"):
        emb(torch.zeros(1, 3, 2), offset=2)


# ---- RelativePositionBias (T5) ------------------------------------------------------------------------------


def test_relative_position_bias_published_example():
    # onnxruntime's RelativePositionBias test (generated with Hugging Face T5): table [[1, 2], [3, 4], [5, 6],
    # [7, 8]], 4 buckets, max_distance 128, 2 heads, length 2 -> output (1, 2, 2, 2) = 1, 7, 3, 1, 2, 8, 4, 2
    rpb = RelativePositionBias(num_heads=2, num_buckets=4, max_distance=128, bidirectional=True)
    with torch.no_grad():
        rpb.embedding.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]))
    assert rpb(2).flatten().tolist() == [1, 7, 3, 1, 2, 8, 4, 2]
    # unidirectional, 3 heads: table rows [1, 2, 3], [4, 5, 6], ... -> 1, 1, 4, 1, 2, 2, 5, 2, 3, 3, 6, 3
    rpb = RelativePositionBias(num_heads=3, num_buckets=4, max_distance=128, bidirectional=False)
    with torch.no_grad():
        rpb.embedding.weight.copy_(torch.arange(1.0, 13.0).reshape(4, 3))
    assert rpb(2).flatten().tolist() == [1, 1, 4, 1, 2, 2, 5, 2, 3, 3, 6, 3]


@pytest.mark.parametrize("L, S", [(7, 7), (3, 9), (9, 3)])
def test_relative_position_bias_layout_bottom_right(L, S):
    torch.manual_seed(0)
    rpb = RelativePositionBias(num_heads=3, num_buckets=8, max_distance=6)
    table = rpb.embedding.weight.detach()  # (buckets, H)
    got = rpb(L, S)
    assert got.shape == (1, 3, L, S)

    def bucket(rel):  # 8 buckets bidirectional: 4 per side, exact below 2, log buckets 2 and 3 up to 6
        n = -rel
        side = 4 if n < 0 else 0
        n = abs(n)
        if n < 2:
            return side + n
        return side + min(3, 2 + int(math.log(n / 2) / math.log(6 / 2) * 2))

    for i in range(L):
        for j in range(S):
            rel = j - (i + S - L)
            torch.testing.assert_close(got[0, :, i, j], table[bucket(rel)])


def test_relative_position_bias_feeds_attention_and_learns():
    torch.manual_seed(0)
    rpb = RelativePositionBias(num_heads=2)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    out = attention(q, k, v, bias=rpb(5))
    out.square().sum().backward()
    assert rpb.embedding.weight.grad.abs().sum() > 0


# ---- RotaryEmbedding ----------------------------------------------------------------------------------------


def ref_rotate(x, positions, base=10000.0):
    """Complex form: z_i = x[2i] + j x[2i+1] times exp(j * pos * base^(-2i/D))."""
    out = x.double().clone()
    D = x.shape[-1]
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).tolist():
        *_, t = idx
        for i in range(D // 2):
            z = complex(x[(*idx, 2 * i)].item(), x[(*idx, 2 * i + 1)].item())
            z *= cmath.exp(1j * positions[t] * base ** (-2 * i / D))
            out[(*idx, 2 * i)], out[(*idx, 2 * i + 1)] = z.real, z.imag
    return out


def test_rotary_module_positions_bottom_right_with_offset():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 2, 6, generator=g, dtype=torch.float64)  # (B, H, L, D)
    k = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64)  # (B, H, S, D)
    rope = RotaryEmbedding(6, base=100.0)
    q_rot, k_rot = rope(q, k, offset=10)
    torch.testing.assert_close(k_rot, ref_rotate(k, list(range(10, 15)), base=100.0))
    torch.testing.assert_close(q_rot, ref_rotate(q, [13, 14], base=100.0))  # the last two key positions


def test_rotary_module_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64)
    rope = RotaryEmbedding(8)
    scores = [(lambda qr, kr: qr @ kr.transpose(-1, -2))(*rope(q, k, offset=o)) for o in (0, 5, 1234)]
    torch.testing.assert_close(scores[1], scores[0])
    torch.testing.assert_close(scores[2], scores[0])
    # a query repeated at every position sees a key repeated at every position through (m - n) only:
    qq, kk = q[:, :, :1].expand_as(q), k[:, :, :1].expand_as(k)
    s = (lambda qr, kr: qr @ kr.transpose(-1, -2))(*rope(qq, kk))  # (B, H, L, S)
    for d in range(-5, 6):
        diag = torch.diagonal(s, offset=d, dim1=-2, dim2=-1)
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag))
    assert not torch.allclose(torch.diagonal(s, 1, -2, -1)[..., 0], torch.diagonal(s, -1, -2, -1)[..., 0])


# ---- ALiBi --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_alibi_module_matches_paper_bias(symmetric):
    alibi = ALiBi(8, symmetric=symmetric)
    got = alibi(4, 6)
    assert got.shape == (1, 8, 4, 6)
    for h in range(8):
        m = 2.0 ** -(h + 1)  # the paper's slopes for 8 heads
        for i in range(4):
            for j in range(6):
                dist = (i + 2) - j
                assert got[0, h, i, j].item() == pytest.approx(-m * (abs(dist) if symmetric else dist))


def test_alibi_with_causal_mask_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    H, L, D = 4, 5, 8
    q, k, v = (torch.randn(1, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v, mask=masks.causal(), bias=ALiBi(H, dtype=torch.float64)(L))
    ref = torch.zeros_like(out)
    slopes = [2.0 ** (-8 * (h + 1) / H) for h in range(H)]
    for h in range(H):
        for i in range(L):
            s = [float(q[0, h, i] @ k[0, h, j]) / math.sqrt(D) - slopes[h] * (i - j) for j in range(i + 1)]
            w = [math.exp(x - max(s)) for x in s]
            ref[0, h, i] = sum(w[j] / sum(w) * v[0, h, j] for j in range(i + 1))
    torch.testing.assert_close(out, ref)


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda: SinusoidalPositionalEncoding(0), ValueError, "embed_dim"),
        (lambda: SinusoidalPositionalEncoding(8, dropout=1.5), ValueError, "dropout"),
        (lambda: SinusoidalPositionalEncoding(8)(torch.zeros(2, 3, 6)), ValueError, "embed_dim"),
        (lambda: SinusoidalPositionalEncoding(8)(torch.zeros(2, 3, 8, dtype=torch.long)), TypeError, "x must"),
        (lambda: SinusoidalPositionalEncoding(8)(torch.zeros(2, 3, 8), offset=-1), ValueError, "offset"),
        (lambda: LearnedPositionalEmbedding(0, 4), ValueError, "max_len"),
        (lambda: RelativePositionBias(0), ValueError, "num_heads"),
        (lambda: RelativePositionBias(2, num_buckets=32, max_distance=4), ValueError, "max_distance"),
        (lambda: RelativePositionBias(2)(-1), ValueError, "query_len"),
        (lambda: RotaryEmbedding(7), ValueError, "head_dim"),
        (lambda: RotaryEmbedding(8)(torch.zeros(1, 2, 3, 6), torch.zeros(1, 2, 3, 6)), ValueError, "head_dim"),
        (lambda: RotaryEmbedding(8)(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 3, 8)), ValueError, "longer"),
        (lambda: ALiBi(0), ValueError, "num_heads"),
        (lambda: ALiBi(4, symmetric="yes"), TypeError, "symmetric"),
    ],
)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
