"""attnkit.functional.attention on bad input: every mistake raises ValueError/TypeError naming the argument.

Proves: wrong ranks, key/value length mismatch, head counts that do not divide, batch dims that do not match,
masks that do not broadcast (tensor or Mask object), float masks, non-floating inputs, mixed dtypes, unknown
normalize/score/backend names, an explicit backend that cannot serve, bad dropout/scale/bias: each is refused
with a message that names what was wrong (nothing silently broadcast into a wrong answer).
"""

import pytest
import torch

from attnkit import masks
from attnkit.functional import additive, attention


def _qkv(B=2, H=4, L=5, S=6, D=8, Hkv=None):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv or H, S, D, generator=g),
            torch.randn(B, Hkv or H, S, D, generator=g))


def test_wrong_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"query must have at least 2 dimensions; got shape \(8,\)"):
        attention(q[0, 0, 0], k, v)
    with pytest.raises(ValueError, match="key must have at least 2 dimensions"):
        attention(q, k[0, 0, 0], v)
    with pytest.raises(ValueError, match="query and key must have the same rank"):
        attention(q, k[0], v[0])


def test_key_value_length_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"key and value must agree .*key \(2, 4, 6, 8\) and value \(2, 4, 5, 8\)"):
        attention(q, k, v[..., :5, :])


def test_head_counts_not_divisible():
    q, k, v = _qkv(H=4, Hkv=3)
    with pytest.raises(ValueError, match="query heads must be a multiple of key/value heads.*4 query heads and 3"):
        attention(q, k, v)
    q, k, v = _qkv(H=2, Hkv=4)
    with pytest.raises(ValueError, match="query heads must be a multiple of key/value heads.*2 query heads and 4"):
        attention(q, k, v)


def test_score_dimension_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scaled_dot scores need query and key of the same last dimension"):
        attention(q, k[..., :5], v)


def test_batch_mismatch_is_not_taken_for_grouped_query():
    """(B, L, D) inputs with query batch 4 and key batch 2: dim -3 is the batch here, not heads."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    with pytest.raises(ValueError, match="batch"):
        attention(q, k, v)


def test_mask_tensor_does_not_broadcast():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"mask must broadcast to \(B, H, L, S\) = \(2, 4, 5, 6\); got \(2, 6\)"):
        attention(q, k, v, mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must broadcast .*got \(3, 1, 5, 6\)"):
        attention(q, k, v, mask=torch.ones(3, 1, 5, 6, dtype=torch.bool))


def test_mask_object_does_not_broadcast():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, mask=masks.dense(torch.ones(3, 1, 5, 6, dtype=torch.bool)))
    with pytest.raises(ValueError, match="graph mask has 4 nodes"):
        attention(q, k, v, mask=masks.graph(torch.tensor([[0], [1]]), num_nodes=4))


def test_padding_batch_mismatch():
    q, k, v = _qkv(B=2)
    with pytest.raises(ValueError, match="padding mask has lengths for batch 3"):
        attention(q, k, v, mask=masks.padding([1, 2, 3]))


def test_padding_batch_mismatch_inside_a_combination():
    q, k, v = _qkv(B=2)
    with pytest.raises(ValueError, match="padding"):
        attention(q, k, v, mask=masks.causal() & masks.padding([1, 2, 3]))


def test_float_mask_where_boolean_expected():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="mask must be a boolean tensor .*got torch.float32.*bias="):
        attention(q, k, v, mask=torch.ones(5, 6))
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        attention(q, k, v, mask=torch.ones(5, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="mask must be an attnkit Mask or a boolean tensor; got list"):
        attention(q, k, v, mask=[[True]])


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_non_floating_inputs(which):
    qkv = dict(zip(("query", "key", "value"), _qkv(), strict=True))
    qkv[which] = qkv[which].long()
    with pytest.raises(TypeError, match=f"{which} must be a floating-point tensor .*got torch.int64"):
        attention(qkv["query"], qkv["key"], qkv["value"])
    qkv[which] = qkv[which].tolist()
    with pytest.raises(TypeError, match=f"{which} must be a torch.Tensor; got list"):
        attention(qkv["query"], qkv["key"], qkv["value"])


def test_mixed_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="query, key and value must share a dtype.*float32, torch.float64"):
        attention(q, k.double(), v)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k, v.half())


def test_mixed_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query, key and value must be on one device; got cpu, meta, cpu"):
        attention(q, k.to("meta"), v)


def test_bad_names():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"normalize must be one of \['none', 'relu', 'sigmoid', 'softmax'\].*'tanh'"):
        attention(q, k, v, normalize="tanh")
    with pytest.raises(ValueError, match="score must be a callable .*got 'additive'.*functools.partial"):
        attention(q, k, v, score="additive")
    with pytest.raises(TypeError, match="score must be a callable"):
        attention(q, k, v, score=3)
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*'math'.*got 'flash'"):
        attention(q, k, v, backend="flash")


def test_explicit_backend_that_cannot_serve():
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    score = lambda a, b: additive(a, b, torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g),  # noqa: E731
                                  torch.randn(3, generator=g))
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this request: SDPA computes dot-product"):
        attention(q, k, v, score=score, backend="sdpa")
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this request: SDPA normalizes with softmax"):
        attention(q, k, v, normalize="relu", backend="sdpa")
    attention(q, k, v, score=score, backend="math")  # the plain path serves everything


def test_bad_scalars_and_bias():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got 1.5"):
        attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        attention(q, k, v, dropout_p="0.1")
    with pytest.raises(TypeError, match="scale must be a float or None; got str"):
        attention(q, k, v, scale="0.5")
    with pytest.raises(TypeError, match="bias must be a floating-point tensor .*masks go in mask="):
        attention(q, k, v, bias=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bias must broadcast to \(B, H, L, S\) = \(2, 4, 5, 6\); got \(4, 6, 5\)"):
        attention(q, k, v, bias=torch.ones(4, 6, 5))


@pytest.mark.parametrize("qb, kb", [((2, 3), (3, 3)), ((4, 1, 2), (3, 1, 2)), ((2, 3, 4), (5, 3, 4))])
def test_batch_dims_that_do_not_broadcast(qb, kb):
    q, k = torch.randn(*qb, 5, 8), torch.randn(*kb, 6, 8)
    with pytest.raises(ValueError, match=r"query and key batch dimensions must broadcast; got query \("):
        attention(q, k, k)


@pytest.mark.parametrize("a, b", [((), ()), ((2, 3), (2, 3)), ((1,), (4,)), ((2, 1, 3), (5, 1)), ((3,), ()),
                                  ((1, 1), (7,)), ((2, 3), (3, 3)), ((4, 2), (3, 2)), ((0,), (1,)), ((0,), (2,))])
def test_shape_broadcast_agrees_with_torch(a, b):
    from attnkit.functional.attention import _broadcast

    try:
        want = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        want = None
    assert _broadcast(a, b) == want
