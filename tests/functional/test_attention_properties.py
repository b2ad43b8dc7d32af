"""Property tests (hypothesis) for attnkit.functional.attention over random shapes, masks, dtypes and backends.

Shapes: batch 1-2, query heads 1-4 with key/value heads dividing them (MHA, GQA, MQA), lengths 1..17 (1, 2, 5,
17 drawn often), head dims 1, 3, 5, 7, 8; masks: random dense (surely holding both True and False), causal and
windows (bottom-right, L != S both ways), padding (B,) and (B, L), and their combinations; dtypes
float64/float32/float16/bfloat16; backends auto/math/sdpa.

Proves, for every draw: output and weights equal the float64 oracle; weights sum to 1 over allowed keys and are 0
elsewhere; fully-masked rows give zero weights, zero output, no NaN, finite gradients; changing masked-out keys
and values changes nothing; masking a key equals deleting it; permuting keys+values (and mask columns) together
changes nothing; adding a constant to a score row changes nothing; causality holds through gradients (no
gradient from query i reaches keys/values after i + S - L; queries that see nothing get no gradient at all).
"""

from dataclasses import dataclass

import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit.functional as F
import reference as R
from attnkit import masks
from attnkit.functional import attention
from reference import attention_ref, causal_ref, padding_ref, random_mask, window_ref

F64 = torch.float64
DTYPES = [F64, torch.float32, torch.float16, torch.bfloat16]
TOL = {F64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}
LENGTHS = st.sampled_from([1, 2, 5, 17]) | st.integers(1, 17)
MASK_KINDS = ["dense", "causal", "window", "padding", "padding_per_query", "causal&dense", "window|dense"]


@dataclass
class Problem:
    B: int
    H: int
    Hkv: int
    L: int
    S: int
    D: int
    Dv: int
    dtype: torch.dtype
    backend: str
    mask_kind: str
    left: int | None
    right: int | None
    seed: int


@st.composite
def problems(draw, dtypes=DTYPES, kinds=MASK_KINDS):
    H = draw(st.sampled_from([1, 2, 3, 4]))
    return Problem(
        B=draw(st.integers(1, 2)), H=H, Hkv=draw(st.sampled_from([h for h in (1, 2, 3, 4) if H % h == 0])),
        L=draw(LENGTHS), S=draw(LENGTHS),
        D=draw(st.sampled_from([1, 3, 5, 7, 8])), Dv=draw(st.sampled_from([1, 2, 5, 6])),
        dtype=draw(st.sampled_from(dtypes)), backend=draw(st.sampled_from(["auto", "math", "sdpa"])),
        mask_kind=draw(st.sampled_from(kinds)), left=draw(st.none() | st.integers(0, 3)),
        right=draw(st.none() | st.integers(0, 3)), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make(p: Problem):
    """q, k, v in p.dtype, the attnkit mask, and the oracle's dense mask (B|1, 1, L, S) built independently."""
    g = torch.Generator().manual_seed(p.seed)
    q = torch.randn(p.B, p.H, p.L, p.D, generator=g).to(p.dtype)
    k = torch.randn(p.B, p.Hkv, p.S, p.D, generator=g).to(p.dtype)  # Hkv divides H: grouped-query when <
    v = torch.randn(p.B, p.Hkv, p.S, p.Dv, generator=g).to(p.dtype)
    dense = random_mask((p.B, 1, p.L, p.S), g, p=0.6)
    if dense.numel() >= 2:
        assert bool(dense.any()) and not bool(dense.all())
    kind = p.mask_kind
    if kind == "dense":
        return q, k, v, dense, dense
    if kind == "causal":
        return q, k, v, masks.causal(), causal_ref(p.L, p.S)
    if kind == "window":
        return q, k, v, masks.window(p.left, p.right), window_ref(p.L, p.S, p.left, p.right)
    if kind in ("padding", "padding_per_query"):
        shape = (p.B,) if kind == "padding" else (p.B, p.L)
        lengths = torch.randint(0, p.S + 1, shape, generator=g)
        return q, k, v, masks.padding(lengths), padding_ref(lengths, p.L, p.S)[:, None]
    if kind == "causal&dense":
        return q, k, v, masks.causal() & dense, causal_ref(p.L, p.S) & dense
    if kind == "window|dense":
        return q, k, v, masks.window(p.left, p.right) | dense, window_ref(p.L, p.S, p.left, p.right) | dense
    raise AssertionError(kind)


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=TOL[dtype], atol=TOL[dtype])


@given(problems())
def test_matches_oracle_weights_sum_to_one(p):
    q, k, v, mask, dense = make(p)
    out, w = attention(q, k, v, mask=mask, backend=p.backend, return_weights=True)
    assert out.dtype == w.dtype == p.dtype
    assert out.shape == (p.B, p.H, p.L, p.Dv) and w.shape == (p.B, p.H, p.L, p.S)
    assert not bool(out.isnan().any()) and not bool(w.isnan().any())
    ref_out, ref_w = attention_ref(q, k, v, mask=dense)
    close(w, ref_w, p.dtype)
    close(out, ref_out, p.dtype)
    allowed = dense.expand(w.shape)
    assert bool((w[~allowed] == 0).all())
    has_key = allowed.any(-1)  # (B, H, L)
    sums = w.double().sum(-1)
    close(sums[has_key], torch.ones_like(sums[has_key]), p.dtype)
    assert bool((w.sum(-1)[~has_key] == 0).all()) and bool((out[~has_key] == 0).all())


@given(problems())
def test_fully_masked_rows_zero_with_finite_gradients(p):
    q, k, v, mask, dense = make(p)
    empty = torch.zeros(p.L, 1, dtype=torch.bool)
    empty[torch.randint(p.L, (1,), generator=torch.Generator().manual_seed(p.seed))] = True
    mask, dense = mask & ~empty, dense & ~empty  # one query row surely sees nothing
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask=mask, backend=p.backend)
    rows = ~dense.expand(p.B, p.H, p.L, p.S).any(-1)  # (B, H, L): queries with no allowed key
    assert bool(rows.any()) and bool((out[rows] == 0).all()) and not bool(out.isnan().any())
    out.backward(torch.ones_like(out))
    for t in (q, k, v):
        assert bool(t.grad.isfinite().all())
    assert bool((q.grad[rows] == 0).all())


def _drop_keys(p: Problem):
    """A key subset to mask out for every query: at least one dropped, at least one kept when S > 1."""
    g = torch.Generator().manual_seed(p.seed + 1)
    keep = random_mask((p.S,), g, p=0.6)
    if p.S == 1:
        keep[0] = False
    return keep


@given(problems())
def test_changing_masked_out_keys_and_values_changes_nothing(p):
    q, k, v, mask, dense = make(p)
    keep = _drop_keys(p)
    mask, dense = mask & keep, dense & keep
    before = attention(q, k, v, mask=mask, backend=p.backend)
    g = torch.Generator().manual_seed(p.seed + 2)
    k2, v2 = k.clone(), v.clone()
    k2[..., ~keep, :] = (torch.randn(k2[..., ~keep, :].shape, generator=g) * 50).to(p.dtype)
    v2[..., ~keep, :] = (torch.randn(v2[..., ~keep, :].shape, generator=g) * 50).to(p.dtype)
    after = attention(q, k2, v2, mask=mask, backend=p.backend)
    torch.testing.assert_close(after, before, rtol=TOL[p.dtype] / 10, atol=TOL[p.dtype] / 10)
    close(after, attention_ref(q, k, v, mask=dense)[0], p.dtype)


@given(problems(kinds=["dense"]))
def test_masking_a_key_equals_deleting_it(p):
    q, k, v, _, dense = make(p)
    keep = _drop_keys(p)
    if not bool(keep.any()):
        keep[0] = True
    masked = attention(q, k, v, mask=dense & keep, backend=p.backend)
    deleted = attention(q, k[..., keep, :], v[..., keep, :], mask=dense[..., keep], backend=p.backend)
    torch.testing.assert_close(masked, deleted, rtol=TOL[p.dtype], atol=TOL[p.dtype])


@given(problems())
def test_permuting_keys_and_values_together_changes_nothing(p):
    q, k, v, mask, dense = make(p)
    perm = torch.randperm(p.S, generator=torch.Generator().manual_seed(p.seed + 3))
    out = attention(q, k, v, mask=mask, backend=p.backend)
    dense_perm = dense.expand(p.B, 1, p.L, p.S)[..., perm]  # structured masks become plain dense columns
    out_perm = attention(q, k[..., perm, :], v[..., perm, :], mask=dense_perm, backend=p.backend)
    torch.testing.assert_close(out_perm, out, rtol=TOL[p.dtype], atol=TOL[p.dtype])


@given(problems(dtypes=[F64, torch.float32]))
def test_adding_a_constant_to_a_score_row_changes_nothing(p):
    q, k, v, mask, _ = make(p)
    row_const = torch.randn(p.B, p.H, p.L, 1, generator=torch.Generator().manual_seed(p.seed + 4), dtype=p.dtype)
    out = attention(q, k, v, mask=mask, backend=p.backend)
    shifted = attention(q, k, v, mask=mask, bias=row_const * 20, backend=p.backend)
    torch.testing.assert_close(shifted, out, rtol=1e-4 if p.dtype == torch.float32 else 1e-10,
                               atol=1e-4 if p.dtype == torch.float32 else 1e-10)


@given(problems(kinds=["causal", "causal&dense"]))
def test_causality_through_gradients(p):
    q, k, v, mask, dense = make(p)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask=mask, backend=p.backend)
    allowed = dense.expand(p.B, 1, p.L, p.S)  # the same for every head
    reached_any = False
    for i in range(p.L):
        gq, gk, gv = torch.autograd.grad(out[..., i, :].sum(), (q, k, v), retain_graph=True)
        future = torch.arange(p.S) > i + p.S - p.L  # keys after the bottom-right aligned diagonal
        assert bool((gk[..., future, :] == 0).all()) and bool((gv[..., future, :] == 0).all()), i
        other_queries = torch.arange(p.L) != i
        assert bool((gq[..., other_queries, :] == 0).all())
        if not bool(allowed[..., i, :].any()):  # sees nothing (i < L - S): no gradient anywhere
            assert bool((gq == 0).all()) and bool((gk == 0).all()) and bool((gv == 0).all())
        else:
            # dV_j = w_ij * 1 > 0 for every allowed j: the gradient really flows where it may
            seen = allowed[..., i, :].unsqueeze(-1).expand(gv.shape)
            reached_any |= bool((gv[seen] != 0).any())
    assert reached_any or not bool(allowed.any())


SCORES = ["dot", "scaled_dot", "general", "additive", "concat_linear", "concat_tanh", "gaussian"]


def _score_pair(name: str, Dq: int, Dk: int, g: torch.Generator, dtype):
    """(attnkit score callable, oracle score callable) with the same random parameters."""
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)  # noqa: E731
    if name in ("dot", "scaled_dot", "gaussian"):
        lib = {"dot": F.dot, "scaled_dot": F.scaled_dot, "gaussian": lambda q, k: F.gaussian(q, k, w=0.7)}[name]
        ref = {"dot": R.dot_ref, "scaled_dot": R.scaled_dot_ref, "gaussian": lambda q, k: R.gaussian_ref(q, k, w=0.7)}
        return lib, ref[name]
    if name == "general":
        W = r(Dq, Dk) / Dq**0.5
        return (lambda q, k: F.general(q, k, W.to(dtype))), (lambda q, k: R.general_ref(q, k, W))
    if name == "additive":
        wq, wk, wv = r(6, Dq), r(6, Dk), r(6)
        return (lambda q, k: F.additive(q, k, wq.to(dtype), wk.to(dtype), wv.to(dtype))), (
            lambda q, k: R.additive_ref(q, k, wq, wk, wv))
    if name == "concat_linear":
        w = r(Dq + Dk)
        return (lambda q, k: F.concat(q, k, w.to(dtype))), (lambda q, k: R.concat_ref(q, k, w))
    W, v = r(5, Dq + Dk), r(5)
    return (lambda q, k: F.concat(q, k, W.to(dtype), v.to(dtype))), (lambda q, k: R.concat_ref(q, k, W, v))


@given(problems(dtypes=[F64, torch.float32]), st.sampled_from(SCORES),
       st.sampled_from(["softmax", "none", "relu", "sigmoid"]), st.sampled_from(["auto", "math", "chunked"]),
       st.sampled_from([None, 0.5]), st.booleans())
def test_every_score_and_normalizer_matches_oracle(p, score_name, normalize, backend, scale, with_bias):
    q, k, v, mask, dense = make(p)
    if score_name not in ("dot", "scaled_dot", "gaussian"):  # key features of another size where allowed
        k = torch.randn(*k.shape[:-1], p.D + 2, generator=torch.Generator().manual_seed(p.seed + 5)).to(p.dtype)
    lib, ref = _score_pair(score_name, q.shape[-1], k.shape[-1], torch.Generator().manual_seed(p.seed + 6), p.dtype)
    bias = torch.randn(p.H, p.L, p.S, generator=torch.Generator().manual_seed(p.seed + 7), dtype=p.dtype) \
        if with_bias else None
    if backend == "chunked" and normalize != "softmax":
        backend = "math"  # the online softmax serves softmax only (refused with a reason otherwise)
    out, w = attention(q, k, v, score=lib, mask=mask, bias=bias, normalize=normalize, scale=scale,
                       backend=backend, return_weights=True)
    ref_out, ref_w = attention_ref(q, k, v, score=ref, mask=dense, bias=bias, normalize=normalize, scale=scale)
    tol = 1e-9 if p.dtype == F64 else 2e-4
    torch.testing.assert_close(w.double(), ref_w, rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
