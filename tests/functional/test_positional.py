"""attnkit.functional.positional against the papers' formulas, written out independently here."""

import cmath
import math
from fractions import Fraction

import pytest
import torch

from attnkit.functional.positional import (
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    relative_position_bucket,
    relative_positions,
    sinusoidal_table,
)

# ----------------------------------------------------------------------------------------------------------
# sinusoidal table (Vaswani et al. 2017, section 3.5)


def ref_sinusoidal(length, d_model, offset=0):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); plain loops."""
    table = []
    for pos in range(offset, offset + length):
        row = []
        for dim in range(d_model):
            i = dim // 2
            angle = pos / 10000 ** (2 * i / d_model)
            row.append(math.sin(angle) if dim % 2 == 0 else math.cos(angle))
        table.append(row)
    return torch.tensor(table, dtype=torch.float64)


@pytest.mark.parametrize("length, d_model, offset", [(50, 16, 0), (7, 7, 0), (5, 1, 3), (9, 32, 2000)])
def test_sinusoidal_table_matches_paper_float64(length, d_model, offset):
    got = sinusoidal_table(length, d_model, offset=offset, dtype=torch.float64)
    assert got.shape == (length, d_model) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref_sinusoidal(length, d_model, offset), rtol=0, atol=1e-12)


def test_sinusoidal_table_float32_stays_accurate_at_large_positions():
    got = sinusoidal_table(4, 12, offset=100_000)  # default dtype float32
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_sinusoidal(4, 12, 100_000), rtol=0, atol=1e-6)


def test_sinusoidal_table_empty_and_known_values():
    assert sinusoidal_table(0, 4).shape == (0, 4)
    # position 0: sin(0) = 0 on even dims, cos(0) = 1 on odd dims
    assert sinusoidal_table(1, 4).tolist() == [[0.0, 1.0, 0.0, 1.0]]


# ----------------------------------------------------------------------------------------------------------
# rotary (Su et al. 2021): complex-number formulation and the relative property


def ref_rotary_complex(x, positions, base=10000.0):
    """z_i = x[2i] + j x[2i+1];  z_i' = z_i * exp(j * pos * base^(-2i/D)); plain Python complex numbers."""
    *lead, L, D = x.shape
    flat = x.double().reshape(-1, L, D)
    out = torch.empty_like(flat)
    for b in range(flat.shape[0]):
        for t in range(L):
            for i in range(D // 2):
                z = complex(flat[b, t, 2 * i].item(), flat[b, t, 2 * i + 1].item())
                z = z * cmath.exp(1j * positions[t] * base ** (-2 * i / D))
                out[b, t, 2 * i], out[b, t, 2 * i + 1] = z.real, z.imag
    return out.reshape(x.shape)


def test_rotary_equals_complex_formulation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)  # (B, H, L, D)
    got = apply_rotary(x, offset=11)
    torch.testing.assert_close(got, ref_rotary_complex(x, list(range(11, 16))), rtol=0, atol=1e-12)
    pos = torch.tensor([0, 7, 3, 100, 2])
    got = apply_rotary(x, pos, base=500.0)
    torch.testing.assert_close(got, ref_rotary_complex(x, pos.tolist(), base=500.0), rtol=0, atol=1e-12)


def test_rotary_per_sequence_positions():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)  # (B, H, L, D)
    pos = torch.tensor([[0, 1, 2, 3], [5, 9, 2, 0]])  # (B, L)
    got = apply_rotary(x, pos[:, None, :])  # (B, 1, L) broadcasts over heads
    for b in range(2):
        torch.testing.assert_close(got[b], ref_rotary_complex(x[b], pos[b].tolist()), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(x, pos)  # (B, L) would line up B with the heads


def test_rotary_dot_product_depends_only_on_offset_difference():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(16, generator=g, dtype=torch.float64)
    k = torch.randn(16, generator=g, dtype=torch.float64)

    def rotated_dot(m, n):
        qm = apply_rotary(q[None, :], torch.tensor([m]))[0]
        kn = apply_rotary(k[None, :], torch.tensor([n]))[0]
        return torch.dot(qm, kn).item()

    for m, n in [(0, 0), (5, 2), (2, 5), (37, 30)]:
        base = rotated_dot(m, n)
        for shift in (1, 13, 1000):
            assert rotated_dot(m + shift, n + shift) == pytest.approx(base, abs=1e-10)
    # and it really depends on m - n (the property is not vacuous)
    assert abs(rotated_dot(5, 2) - rotated_dot(2, 5)) > 1e-3
    # rotation keeps the norm
    x = torch.randn(4, 6, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_rotary(x, offset=9).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_rotary_low_precision_close_to_float64(dtype, atol):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 16, generator=g)
    got = apply_rotary(x.to(dtype), offset=3000)
    assert got.dtype == dtype
    ref = apply_rotary(x.to(dtype).double(), offset=3000)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# ALiBi (Press et al. 2022)


def test_alibi_slopes_eight_heads_are_powers_of_one_half():
    # the paper: "for 8 heads the slopes are 1/2^1, 1/2^2, ..., 1/2^8"
    assert alibi_slopes(8, dtype=torch.float64).tolist() == [1 / 2**i for i in range(1, 9)]


def test_alibi_slopes_sixteen_heads_start_at_sqrt_half():
    # "for 16 heads ... 1/2^0.5, 1/2^1, 1/2^1.5, ..., 1/2^8"
    ref = [2 ** (-0.5 * i) for i in range(1, 17)]
    torch.testing.assert_close(alibi_slopes(16, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64))


@pytest.mark.parametrize(
    "num_heads, exponents",
    [
        # 12 heads: the 8-head slopes, then every other 16-head slope (2^-0.5, 2^-1.5, ...), 4 of them
        (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
        # 6 heads: the 4-head slopes (2^-2 ...), then 2^-1, 2^-3 from the 8-head sequence
        (6, [2, 4, 6, 8, 1, 3]),
        (1, [8]),
        # 3 heads: the 2-head slopes 2^-4, 2^-8, then the first of every other 4-head slope: 2^-2
        (3, [4, 8, 2]),
    ],
)
def test_alibi_slopes_non_power_of_two(num_heads, exponents):
    ref = torch.tensor([2.0 ** -e for e in exponents], dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(num_heads, dtype=torch.float64), ref, rtol=1e-15, atol=0)


@pytest.mark.parametrize("L, S", [(5, 5), (3, 7), (6, 2), (1, 4)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_alibi_bias_matches_loops(L, S, symmetric):
    slopes = alibi_slopes(4, dtype=torch.float64)
    got = alibi_bias(slopes, L, S, symmetric=symmetric)
    assert got.shape == (1, 4, L, S) and got.dtype == torch.float64
    ref = torch.empty(1, 4, L, S, dtype=torch.float64)
    for h in range(4):
        for i in range(L):
            q_pos = i + S - L  # bottom-right: the last query sits on the last key
            for j in range(S):
                dist = q_pos - j
                ref[0, h, i, j] = -slopes[h].item() * (abs(dist) if symmetric else dist)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_alibi_bias_causal_form_gives_paper_weights_under_causal_mask():
    # paper (figure 3): query i adds -m * (i - j) to the score of each key j <= i; check the softmax of
    # the allowed part of each row against a plain loop.
    L = 6
    m = alibi_slopes(2, dtype=torch.float64)
    bias = alibi_bias(m, L)[0]  # (H, L, L)
    for h in range(2):
        for i in range(L):
            row = [-m[h].item() * (i - j) for j in range(i + 1)]
            ex = [math.exp(v) for v in row]
            ref = [e / sum(ex) for e in ex]
            got = torch.softmax(bias[h, i, : i + 1], dim=-1)
            torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# T5 relative position buckets (Raffel et al. 2020)


def ref_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """Re-derived from the rule, with exact rational arithmetic instead of logarithms.

    n = query pos - key pos. Bidirectional: half of the buckets for keys after the query (offset N), n = |n|.
    Unidirectional: n = max(n, 0). Buckets 0..N/2-1 hold one distance each. Bucket b >= N/2 starts at the
    smallest n with n >= (N/2) * (max_distance / (N/2))^((b - N/2) / (N - N/2)); the last bucket is open-ended.
    Raised to the power (N - N/2), that threshold test is an exact integer comparison.
    """
    n = -relative_position
    offset = 0
    N = num_buckets
    if bidirectional:
        N //= 2
        offset = N if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    e = N // 2
    if n < e:
        return offset + n
    bucket = e
    for b in range(e + 1, N):
        lhs = Fraction(n) ** (N - e) * Fraction(e) ** (b - e)
        rhs = Fraction(e) ** (N - e) * Fraction(max_distance) ** (b - e)
        if lhs >= rhs:
            bucket = b
    return offset + bucket


@pytest.mark.parametrize(
    "bidirectional, num_buckets, max_distance",
    [(True, 32, 128), (False, 32, 128), (True, 64, 256), (False, 16, 50), (True, 8, 20), (True, 4, 128)],
)
def test_relative_position_bucket_matches_rederived_rule(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-400, 401)
    got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                   max_distance=max_distance)
    ref = [ref_bucket(r, bidirectional, num_buckets, max_distance) for r in rel.tolist()]
    assert got.dtype == torch.int64
    assert got.tolist() == ref
    assert got.min() >= 0 and got.max() < num_buckets


def test_relative_position_bucket_t5_defaults_hand_values():
    # T5 encoder (bidirectional, 32 buckets, max_distance 128): N = 16 per direction, exact up to 7;
    # n = 16: 8 + floor(log(16/8) / log(128/8) * 8) = 8 + 2 = 10; n >= 128 lands in the last bucket 15.
    rel = torch.tensor([0, -1, -7, -8, -16, -127, -128, -5000, 1, 16, 5000])
    assert relative_position_bucket(rel).tolist() == [0, 1, 7, 8, 10, 15, 15, 15, 17, 26, 31]
    # T5 decoder (unidirectional): keys after the query all go to bucket 0; N = 32, exact up to 15
    assert relative_position_bucket(rel, bidirectional=False).tolist() == [0, 1, 7, 8, 16, 31, 31, 31, 0, 0, 0]


def test_relative_positions_bottom_right():
    got = relative_positions(2, 4)
    # query 0 sits at key position 2, query 1 at 3
    assert got.tolist() == [[-2, -1, 0, 1], [-3, -2, -1, 0]]


# ----------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda: sinusoidal_table(-1, 4), ValueError, "length"),
        (lambda: sinusoidal_table(3, 0), ValueError, "embed_dim"),
        (lambda: sinusoidal_table(3, 4.0), TypeError, "embed_dim"),
        (lambda: sinusoidal_table(3, 4, base=0.0), ValueError, "base"),
        (lambda: apply_rotary(torch.randn(2, 5, 7)), ValueError, "even"),
        (lambda: apply_rotary(torch.arange(8).reshape(2, 4)), TypeError, "x must"),
        (lambda: apply_rotary(torch.randn(2, 3, 4), torch.tensor([0.0, 1.0, 2.0])), TypeError, "positions"),
        (lambda: apply_rotary(torch.randn(2, 3, 4), torch.arange(4)), ValueError, "positions"),
        (lambda: apply_rotary(torch.randn(2, 3, 4), offset=-1), ValueError, "offset"),
        (lambda: alibi_slopes(0), ValueError, "num_heads"),
        (lambda: alibi_slopes(2.5), TypeError, "num_heads"),
        (lambda: alibi_bias(torch.arange(4), 3), TypeError, "slopes"),
        (lambda: alibi_bias(torch.ones(2, 2), 3), ValueError, "slopes"),
        (lambda: alibi_bias(torch.ones(2), -3), ValueError, "query_len"),
        (lambda: relative_position_bucket(torch.tensor([0.5])), TypeError, "relative_position"),
        (lambda: relative_position_bucket(torch.tensor([1]), num_buckets=2), ValueError, "num_buckets"),
        (lambda: relative_position_bucket(torch.tensor([1]), max_distance=8), ValueError, "max_distance"),
    ],
)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
