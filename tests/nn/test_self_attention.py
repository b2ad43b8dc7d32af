"""SelfAttention against the course-notes formula written out here in float64:
Q = X W_q^T, K = X W_k^T, V = X W_v^T;  A' = softmax(Q K^T / sqrt(d_k)) (masked);  O = A' V."""

import math

import pytest
import torch
from torch import nn

from attnkit import masks
from attnkit.functional.scores import dot
from attnkit.nn.self_attention import SelfAttention


def ref_self_attention(m, x, mask=None, scaled=True):
    """Plain float64 self-attention with ``m``'s three projections; mask (L, L) bool True = attend."""
    x = x.double()

    def lin(p):
        y = x @ p.weight.detach().double().T
        return y + p.bias.detach().double() if p.bias is not None else y

    Q, K, V = lin(m.W_q), lin(m.W_k), lin(m.W_v)  # (B, L, d_k), (B, L, d_k), (B, L, d_v)
    B, L, d_k = Q.shape
    out = torch.zeros(B, L, V.shape[-1], dtype=torch.float64)
    weights = torch.zeros(B, L, L, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            # alpha_{i,j} = q_i . k_j / sqrt(d_k) over allowed j
            allowed = [j for j in range(L) if mask is None or bool(mask[i, j])]
            alpha = [float(Q[b, i] @ K[b, j]) / (math.sqrt(d_k) if scaled else 1.0) for j in allowed]
            top = max(alpha)
            e = [math.exp(a - top) for a in alpha]
            for j, ej in zip(allowed, e, strict=True):
                # alpha'_{i,j} = exp(alpha_{i,j}) / sum_j' exp(alpha_{i,j'});  b_i = sum_j alpha'_{i,j} v_j
                weights[b, i, j] = ej / sum(e)
                out[b, i] += weights[b, i, j] * V[b, j]
    return out, weights


@pytest.mark.parametrize("bias", [False, True])
def test_matches_plain_formula(bias):
    torch.manual_seed(0)
    m = SelfAttention(6, kdim=4, vdim=5, bias=bias).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    out, w = m(x, return_weights=True)
    out_r, w_r = ref_self_attention(m, x)
    assert out.shape == (2, 7, 5)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(w, w_r, atol=1e-10, rtol=0)
    # float32 module against the same float64 formula
    m32 = m.float()
    torch.testing.assert_close(m32(x.float()).double(), out_r, atol=1e-5, rtol=0)


def test_masks_tensor_and_object():
    torch.manual_seed(1)
    m = SelfAttention(4).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(6, 6, generator=g) > 0.5
    dense[:, 0] = True  # every row keeps at least one key
    assert dense.any() and not dense.all()
    out, w = m(x, mask=dense, return_weights=True)
    out_r, w_r = ref_self_attention(m, x, mask=dense)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(w, w_r, atol=1e-10, rtol=0)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    out_c = m(x, mask=masks.causal())
    torch.testing.assert_close(out_c, ref_self_attention(m, x, mask=causal)[0], atol=1e-10, rtol=0)


def test_injected_scores():
    torch.manual_seed(2)
    m = SelfAttention(4, score=dot).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref_self_attention(m, x, scaled=False)[0], atol=1e-10, rtol=0)

    class Bilinear(nn.Module):
        """score(q, k) = q W k^T with a learned W."""

        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d, d, dtype=torch.float64))

        def forward(self, q, k):
            return q @ self.weight @ k.transpose(-1, -2)

    score = Bilinear(3)
    m = SelfAttention(4, kdim=3, score=score).double()
    assert "score.weight" in dict(m.named_parameters())  # a module score is registered
    out, w = m(x, return_weights=True)
    Q, K, V = m.W_q(x), m.W_k(x), m.W_v(x)
    expected = torch.softmax(Q @ score.weight @ K.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(w, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(out, expected @ V, atol=1e-10, rtol=0)


def test_only_three_projections_and_leading_dims():
    m = SelfAttention(8)
    assert sorted(n for n, _ in m.named_parameters()) == ["W_k.weight", "W_q.weight", "W_v.weight"]
    x = torch.randn(2, 3, 5, 8)  # extra leading dims
    out = m(x)
    assert out.shape == (2, 3, 5, 8)
    torch.testing.assert_close(out[1, 2], m(x[1, 2]), atol=1e-6, rtol=0)


def test_q_k_v_differ_so_attention_is_not_symmetric():
    """Seed 002: separate W_q and W_k make the score matrix asymmetric (one shared matrix would not)."""
    torch.manual_seed(3)
    m = SelfAttention(6, score=dot)
    x = torch.randn(1, 5, 6)
    scores = m.W_q(x) @ m.W_k(x).transpose(-1, -2)
    assert not torch.allclose(scores, scores.transpose(-1, -2), atol=1e-3)


def test_errors():
    m = SelfAttention(4)
    with pytest.raises(ValueError, match="embed_dim"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="x"):
        m(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="score"):
        SelfAttention(4, score="not callable")
    with pytest.raises(ValueError, match="kdim"):
        SelfAttention(4, kdim=0)
    with pytest.raises(TypeError, match="mask"):
        m(torch.randn(2, 3, 4), mask=torch.ones(3, 3))
