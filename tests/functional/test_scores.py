"""attnkit.functional.scores: every score function vs the float64 oracle (tests/reference.py), plus gradcheck.

Proves: the six score functions (dot, scaled_dot, general, additive, concat's two rules, gaussian) compute the
equations of seeds 003/004 for batched, head-split shapes with Dq != Dk where allowed; gradients through
``attention`` (with a mask, both backends where they apply) pass ``torch.autograd.gradcheck`` in float64;
shape mistakes raise ValueError naming the weight.
"""

import math
from functools import partial

import pytest
import torch
from torch.autograd import gradcheck

from attnkit.functional import additive, attention, concat, dot, gaussian, general, scaled_dot
from reference import (
    additive_ref,
    assert_mixed,
    attention_ref,
    concat_ref,
    dot_ref,
    gaussian_ref,
    general_ref,
    random_mask,
    scaled_dot_ref,
)

F64 = torch.float64


def _qk(gen, dq=5, dk=5, L=4, S=7, lead=(2, 3), dtype=F64):
    q = torch.randn(*lead, L, dq, generator=gen, dtype=dtype)
    k = torch.randn(*lead, S, dk, generator=gen, dtype=dtype)
    return q, k


def _params(gen, dq=5, dk=3, hidden=6, dtype=F64):
    """Weights for the parametrized scores, drawn once: general W, additive W_q/W_k/w_v, concat w / (W, v)."""
    r = partial(torch.randn, generator=gen, dtype=dtype)
    return {
        "W": r(dq, dk), "w_q": r(hidden, dq), "w_k": r(hidden, dk), "w_v": r(hidden),
        "w_cat": r(dq + dk), "W_cat": r(hidden, dq + dk), "v_cat": r(hidden),
    }


def test_hand_computed_values():
    # q = (1, 2), k = (3, -1): q.k = 1; ||q - k||^2 = 4 + 9 = 13
    q, k = torch.tensor([[1.0, 2.0]], dtype=F64), torch.tensor([[3.0, -1.0]], dtype=F64)
    assert dot(q, k).item() == 1.0 == dot_ref(q, k).item()
    assert scaled_dot(q, k).item() == pytest.approx(1 / math.sqrt(2)) == scaled_dot_ref(q, k).item()
    assert gaussian(q, k, w=2.0).item() == pytest.approx(-(4 * 13) / 2) == gaussian_ref(q, k, w=2.0).item()
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)  # q^T W k = 1*3 + 2*2*(-1) = -1
    assert general(q, k, W).item() == pytest.approx(-1.0) == general_ref(q, k, W).item()
    w = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)  # w^T [q; k] = 1 + 2 + 3 - 1 = 5
    assert concat(q, k, w).item() == pytest.approx(5.0) == concat_ref(q, k, w).item()


@pytest.mark.parametrize("name", ["dot", "scaled_dot", "scaled_dot_scale", "gaussian_1", "gaussian_w"])
def test_same_size_scores_match_oracle(gen, name):
    q, k = _qk(gen)
    w = torch.tensor(0.7, dtype=F64)
    lib, ref = {
        "dot": (dot(q, k), dot_ref(q, k)),
        "scaled_dot": (scaled_dot(q, k), scaled_dot_ref(q, k)),
        "scaled_dot_scale": (scaled_dot(q, k, scale=0.3), scaled_dot_ref(q, k, scale=0.3)),
        "gaussian_1": (gaussian(q, k), gaussian_ref(q, k)),
        "gaussian_w": (gaussian(q, k, w=w), gaussian_ref(q, k, w=w)),
    }[name]
    assert lib.shape == (2, 3, 4, 7)
    torch.testing.assert_close(lib, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["general", "additive", "concat_linear", "concat_tanh"])
def test_parametrized_scores_match_oracle_with_different_sizes(gen, name):
    q, k = _qk(gen, dq=5, dk=3)  # q and k of different sizes (seed 003: additive allows it)
    p = _params(gen)
    lib, ref = {
        "general": (general(q, k, p["W"]), general_ref(q, k, p["W"])),
        "additive": (additive(q, k, p["w_q"], p["w_k"], p["w_v"]), additive_ref(q, k, p["w_q"], p["w_k"], p["w_v"])),
        "concat_linear": (concat(q, k, p["w_cat"]), concat_ref(q, k, p["w_cat"])),
        "concat_tanh": (concat(q, k, p["W_cat"], p["v_cat"]), concat_ref(q, k, p["W_cat"], p["v_cat"])),
    }[name]
    assert lib.shape == (2, 3, 4, 7)
    torch.testing.assert_close(lib, ref, rtol=1e-12, atol=1e-12)


def test_scores_float32_close_to_oracle(gen):
    q, k = _qk(gen, dtype=torch.float32)
    p = {n: t.float() for n, t in _params(gen, dq=5, dk=5).items()}
    pairs = [
        (dot(q, k), dot_ref(q, k)),
        (scaled_dot(q, k), scaled_dot_ref(q, k)),
        (general(q, k, p["W"]), general_ref(q, k, p["W"])),
        (additive(q, k, p["w_q"], p["w_k"], p["w_v"]), additive_ref(q, k, p["w_q"], p["w_k"], p["w_v"])),
        (concat(q, k, p["W_cat"], p["v_cat"]), concat_ref(q, k, p["W_cat"], p["v_cat"])),
        (gaussian(q, k, w=0.5), gaussian_ref(q, k, w=0.5)),
    ]
    for lib, ref in pairs:
        assert lib.dtype == torch.float32
        torch.testing.assert_close(lib.double(), ref, rtol=1e-5, atol=1e-5)


# ---- gradcheck through attention, with a mask -----------------------------------------------------------


def _masked_inputs(gen, dq=3, dk=3, L=3, S=4):
    q, k = _qk(gen, dq=dq, dk=dk, L=L, S=S, lead=(2,))
    v = torch.randn(2, S, 2, generator=gen, dtype=F64)
    mask = random_mask((2, L, S), gen, p=0.6)
    mask[:, :, 0] = True  # every query keeps one key: the softmax is smooth everywhere
    assert_mixed(mask)
    return q, k, v, mask


@pytest.mark.parametrize("name", ["dot", "scaled_dot"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_gradcheck_dot_scores(gen, name, backend):
    q, k, v, mask = _masked_inputs(gen)
    score = {"dot": dot, "scaled_dot": scaled_dot}[name]
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        return attention(q, k, v, score=score, mask=mask, backend=backend)

    assert gradcheck(fn, inputs)
    ref, _ = attention_ref(q, k, v, score={"dot": dot_ref, "scaled_dot": scaled_dot_ref}[name], mask=mask)
    torch.testing.assert_close(fn(*inputs), ref)


@pytest.mark.parametrize("name", ["general", "additive", "concat_linear", "concat_tanh", "gaussian"])
def test_gradcheck_parametrized_scores(gen, name):
    dq, dk = (3, 2) if name != "gaussian" else (3, 3)
    q, k, v, mask = _masked_inputs(gen, dq=dq, dk=dk)
    p = _params(gen, dq=dq, dk=dk, hidden=3)
    lib, ref, params = {
        "general": (general, general_ref, [p["W"]]),
        "additive": (additive, additive_ref, [p["w_q"], p["w_k"], p["w_v"]]),
        "concat_linear": (concat, concat_ref, [p["w_cat"]]),
        "concat_tanh": (concat, concat_ref, [p["W_cat"], p["v_cat"]]),
        "gaussian": (lambda q, k, w: gaussian(q, k, w=w), lambda q, k, w: gaussian_ref(q, k, w=w),
                     [torch.tensor(0.8, dtype=F64)]),
    }[name]
    inputs = tuple(t.requires_grad_() for t in (q, k, v, *params))

    def fn(q, k, v, *params):
        return attention(q, k, v, score=lambda a, b: lib(a, b, *params), mask=mask)

    assert gradcheck(fn, inputs)
    out = fn(*inputs)
    ref_out, _ = attention_ref(q, k, v, score=lambda a, b: ref(a, b, *params), mask=mask)
    torch.testing.assert_close(out, ref_out)


def test_score_names_resolve(gen):
    q, k = _qk(gen, L=3, S=4, lead=(2,))
    v = torch.randn(2, 4, 3, generator=gen, dtype=F64)
    for name, ref in (("dot", dot_ref), ("scaled_dot", scaled_dot_ref), ("gaussian", gaussian_ref)):
        out = attention(q, k, v, score=name)
        torch.testing.assert_close(out, attention_ref(q, k, v, score=ref)[0])


# ---- shape mistakes ---------------------------------------------------------------------------------------


def test_score_shape_errors_name_the_weight(gen):
    q, k = _qk(gen, dq=5, dk=3)
    p = _params(gen)
    with pytest.raises(ValueError, match="dot scores need query and key of the same last dimension"):
        dot(q, k)
    with pytest.raises(ValueError, match="scaled_dot"):
        scaled_dot(q, k)
    with pytest.raises(ValueError, match="gaussian"):
        gaussian(q, k)
    with pytest.raises(ValueError, match=r"general score weight must have shape \(Dq, Dk\) = \(5, 3\)"):
        general(q, k, p["W"].T)
    with pytest.raises(ValueError, match="additive score weights"):
        additive(q, k, p["w_k"], p["w_q"], p["w_v"])
    with pytest.raises(ValueError, match=r"concat score weight must have shape \(Dq \+ Dk,\)"):
        concat(q, k, p["w_cat"][:-1])
    with pytest.raises(ValueError, match="concat score with a 2-D weight needs v"):
        concat(q, k, p["W_cat"])
    with pytest.raises(ValueError, match="v is only used with a 2-D weight"):
        concat(q, k, p["w_cat"], p["v_cat"])


# ---- numerics --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 1000.0])
def test_gaussian_float32_accuracy_far_from_origin(gen, shift):
    """-(w ||q - k||)^2 / 2 depends on q - k only, so moving every point by the same amount changes nothing.

    Nadaraya-Watson inputs (times, positions) often sit far from 0. FlashAttention's rule: the float32 result may
    be at most twice as far from the float64 oracle as the plain float32 formula is (plus 1e-5).
    """
    x = torch.rand(1, 50, 1, generator=gen) * 5 + shift  # queries
    x_i = torch.rand(1, 40, 1, generator=gen) * 5 + shift  # keys
    ref = gaussian_ref(x, x_i, w=4.0)
    plain32 = -((4.0 * (x.unsqueeze(-2) - x_i.unsqueeze(-3))) ** 2).sum(-1) / 2  # the equation, in float32
    err_plain = (plain32.double() - ref).abs().max().item()
    err = (gaussian(x, x_i, w=4.0).double() - ref).abs().max().item()
    assert err <= 2 * err_plain + 1e-5, f"gaussian float32 error {err:.3g} vs plain float32 {err_plain:.3g}"
