"""The masks users asked for (packed documents, prefix-LM, top-left causal, ~mask, 2-D neighbourhoods, mask
functions), each against a plain construction of its definition, on every path that evaluates a mask:
``materialize``, ``allowed`` on tiles, ``tile_states`` (never wrong about empty or full) and the plan."""

from __future__ import annotations

import pytest
import torch

from attnkit import masks
from attnkit.functional import attention
from reference import attention_ref


def _docs_ref(lengths, L):
    ids = torch.full((L,), -1)
    pos = 0
    for d, n in enumerate(lengths):
        ids[pos : pos + n] = d
        pos += n
    return (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)


def _natten_ref(Hg, Wg, k, d=1, causal=False):
    n = Hg * Wg
    out = torch.zeros(n, n, dtype=torch.bool)

    def axis(q, kv, size):
        if q % d != kv % d:
            return False
        qg, kg = q // d, kv // d
        if causal:
            return qg - k < kg <= qg
        group = len(range(q % d, size, d))
        r = k // 2
        c = min(max(qg, r), group - 1 - r)
        return abs(c - kg) <= r

    for i in range(n):
        for j in range(n):
            out[i, j] = axis(i // Wg, j // Wg, Hg) and axis(i % Wg, j % Wg, Wg)
    return out


CASES = {
    "documents": (masks.documents([7, 0, 20, 13], total=45), lambda: _docs_ref([7, 0, 20, 13], 45), 45, 45),
    "documents_causal": (masks.documents([7, 20, 18]) & masks.causal(),
                         lambda: _docs_ref([7, 20, 18], 45) & torch.ones(45, 45, dtype=torch.bool).tril(), 45, 45),
    "top_left_causal": (masks.causal(align="top_left"), lambda: torch.ones(30, 45, dtype=torch.bool).tril(), 30, 45),
    "bottom_right_causal": (masks.causal(), lambda: torch.ones(30, 45, dtype=torch.bool).tril(15), 30, 45),
    "not_window": (~masks.window(3, 2), lambda: ~(torch.ones(40, 40, dtype=torch.bool).tril(2)
                                                 & torch.ones(40, 40, dtype=torch.bool).triu(-3)), 40, 40),
    "natten": (masks.neighborhood(6, 7, 3), lambda: _natten_ref(6, 7, 3), 42, 42),
    "natten_dilated": (masks.neighborhood(8, 6, 3, dilation=2), lambda: _natten_ref(8, 6, 3, 2), 48, 48),
    "natten_causal": (masks.neighborhood(6, 7, 3, causal=True), lambda: _natten_ref(6, 7, 3, causal=True), 42, 42),
    "natten_truncated": (masks.neighborhood(6, 7, 3, shift=False), lambda: (
        ((torch.arange(42)[:, None] // 7 - torch.arange(42)[None, :] // 7).abs() <= 1)
        & ((torch.arange(42)[:, None] % 7 - torch.arange(42)[None, :] % 7).abs() <= 1)), 42, 42),
    "mask_mod": (masks.mask_mod(lambda b, h, q, kv: (q - kv) % 5 == 0), lambda: (
        (torch.arange(37)[:, None] - torch.arange(37)[None, :]) % 5 == 0), 37, 37),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mask_matches_its_definition_everywhere(name):
    mask, ref_fn, L, S = CASES[name]
    ref = ref_fn()
    assert ref.any() and not ref.all()
    assert torch.equal(mask.materialize(L, S), ref)
    for block in (4, 8, 16):
        plan = mask.plan(L, S, block)
        nq, nk = -(-L // block), -(-S // block)
        padded = torch.zeros(nq * block, nk * block, dtype=torch.bool)
        padded[:L, :S] = ref
        tiles = padded.view(nq, block, nk, block)
        assert torch.equal(plan.states > 0, tiles.any(3).any(1)), block  # exact after planning
        full = plan.states == masks.FULL
        inside = torch.zeros_like(padded)
        inside[:L, :S] = True
        assert not (full & ~(tiles | ~inside.view(nq, block, nk, block)).all(3).all(1)).any()
        assert torch.equal(plan.materialize(L, S), ref)


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_through_the_plan_matches_the_dense_mask(name, gen):
    mask, ref_fn, L, S = CASES[name]
    q = torch.randn(2, 2, L, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(2, 2, S, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(2, 2, S, 8, dtype=torch.float64, generator=gen)
    ref = attention_ref(q, k, v, mask=ref_fn())[0]
    for backend in ("blocksparse", "tiled", "math"):
        torch.testing.assert_close(attention(q, k, v, mask=mask, backend=backend), ref, atol=1e-10, rtol=1e-10)


def test_prefix_lm_per_batch(gen):
    m = masks.prefix_lm(torch.tensor([3, 10]))
    dense = m.materialize(12, 12, batch_ndim=1)  # (B, L, S)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    for b, n in enumerate((3, 10)):
        ref = causal.clone()
        ref[:, :n] = True
        assert torch.equal(dense[b], ref)


def test_documents_from_ids_with_batch_and_padding():
    ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 2, 2, 2]])
    m = masks.documents(ids=ids)
    dense = m.materialize(6, 6, batch_ndim=2)  # (B, 1, L, S)
    ref = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    assert torch.equal(dense[:, 0], ref)
    unused = m.unused_keys(6, 6, 2)
    assert unused is not None and bool(unused[0, 0, 5, 0]) and not bool(unused[1, 0, 5, 0])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one of lengths"):
        masks.documents()
    with pytest.raises(ValueError, match="kernel must be odd"):
        masks.neighborhood(5, 5, 2)
    with pytest.raises(ValueError, match="kernel \\* dilation"):
        masks.neighborhood(5, 5, 3, dilation=2)
    with pytest.raises(ValueError, match="align"):
        masks.causal(align="middle")
    with pytest.raises(ValueError, match="L and S must be 45"):
        masks.documents([20, 25]).materialize(40, 40)
    with pytest.raises(TypeError, match="bool tensor"):
        masks.mask_mod(lambda b, h, q, kv: q - kv).materialize(4, 4)


def test_a_mask_edited_in_place_is_replanned():
    t = torch.zeros(64, 64, dtype=torch.bool)
    t[:16, :16] = True
    m = masks.dense(t)
    assert int((m.plan(64, 64, 16).states > 0).sum()) == 1
    t[40:, 40:] = True  # in place: the version counter moves
    assert int((m.plan(64, 64, 16).states > 0).sum()) == 5  # tiles (2..3, 2..3) join tile (0, 0)
    t.numpy()[:, :] = False  # through NumPy the version does not move: forget() says so
    m.forget()
    assert int((m.plan(64, 64, 16).states > 0).sum()) == 0
