"""attnkit.flex against FlexAttention itself and against the float64 oracle.

The score_mods and mask_mods are those of PyTorch's ``test/inductor/test_flex_attention.py`` (identity,
times_two, squared, causal, rel_bias, alibi, head_offset with a captured buffer, trig, tanh soft-cap, sliding
window, prefix-LM, document masking, document + causal, NATTEN 2-D, fully masked rows), written here again.
Each runs through ``attnkit.flex`` and through ``torch.nn.attention.flex_attention`` eagerly on the CPU (forward
only: FlexAttention refuses backward there), and through :func:`reference.flex_ref` in float64 for the forward
and the gradients to q, k, v and every captured floating tensor. Sizes are ragged (not multiples of the tile,
L != S), with GQA and batch/head-dependent mods.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from attnkit import flex, masks
from attnkit.functional import attention
from reference import flex_ref

tfa = pytest.importorskip("torch.nn.attention.flex_attention")

H_, W_ = 12, 14  # NATTEN grid: 168 positions
K_ = 5


def _natten(b, h, q_idx, kv_idx):  # the flex blog's NATTEN mask: the kernel centre clamped inside the grid
    q_x, q_y = q_idx // W_, q_idx % W_
    kv_x, kv_y = kv_idx // W_, kv_idx % W_
    c_x = q_x.clamp(K_ // 2, (H_ - 1) - K_ // 2)
    c_y = q_y.clamp(K_ // 2, (W_ - 1) - K_ // 2)
    return ((c_x - kv_x).abs() <= K_ // 2) & ((c_y - kv_y).abs() <= K_ // 2)


def _fork(gen: torch.Generator) -> torch.Generator:
    """A CPU generator in ``gen``'s state: the same draws twice (once for the CPU reference, once for a device)."""
    g = torch.Generator()
    g.set_state(gen.get_state())
    return g


def _score_mods(H: int, L: int, S: int, gen, device="cpu"):
    """name -> (score_mod, captured floating tensors). Captured tensors are float64 leaves, drawn on the CPU and
    placed on ``device``."""
    def leaf(t):
        return t.to(device).requires_grad_()

    rel = leaf(torch.randn(L + S, dtype=torch.float64, generator=gen))
    slopes = leaf(torch.rand(H, dtype=torch.float64, generator=gen))
    head_offset = leaf(torch.randn(H, dtype=torch.float64, generator=gen))
    batch_bias = leaf(torch.randn(2, dtype=torch.float64, generator=gen))
    return {
        "identity": (lambda s, b, h, q, kv: s, []),
        "times_two": (lambda s, b, h, q, kv: s * 2, []),
        "squared": (lambda s, b, h, q, kv: s * s, []),
        "causal_mod": (lambda s, b, h, q, kv: torch.where(q >= kv, s, float("-inf")), []),
        "rel_bias": (lambda s, b, h, q, kv: s + rel[q - kv + S], [rel]),
        "alibi": (lambda s, b, h, q, kv: s + slopes[h] * (kv - q), [slopes]),
        "head_offset": (lambda s, b, h, q, kv: s + head_offset[h], [head_offset]),
        "trig": (lambda s, b, h, q, kv: torch.sin(s) + torch.cos(q.to(s.dtype) * 0.1) * torch.sin(kv.to(s.dtype)), []),
        "tanh_softcap": (lambda s, b, h, q, kv: 3.0 * torch.tanh(s / 3.0), []),
        "batch_bias": (lambda s, b, h, q, kv: s + batch_bias[b], [batch_bias]),
    }


def _mask_mods(L: int, gen, device="cpu"):
    docs = torch.sort(torch.randint(0, 4, (2, L), generator=gen), dim=-1).values.to(device)  # (B, L) document ids
    prefix = torch.tensor([L // 3, L // 5], device=device)

    def causal(b, h, q, kv):
        return q >= kv

    def sliding_window(b, h, q, kv):
        return (q - kv).abs() <= 37

    def prefix_lm(b, h, q, kv):
        return (kv <= q) | (kv < prefix[b])

    def document(b, h, q, kv):
        return docs[b, q] == docs[b, kv]

    def head_window(b, h, q, kv):  # a head-dependent mask: head h sees 10 (h + 1) keys back
        return (q >= kv) & (q - kv <= 10 * (h + 1))

    def fully_masked_rows(b, h, q, kv):  # the first L // 4 queries see nothing
        return q >= kv + L // 4

    return {"causal": causal, "sliding_window": sliding_window, "prefix_lm": prefix_lm, "document": document,
            "document_causal": flex.and_masks(document, causal), "head_window": head_window,
            "fully_masked_rows": fully_masked_rows, "noop": flex.noop_mask}


def _qkv(B, Hq, Hkv, L, S, D, dtype, gen, grad=False):
    q = torch.randn(B, Hq, L, D, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, S, D, dtype=dtype, generator=gen)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _torch_flex(q, k, v, score_mod, mask_mod, B, H, L, S, gqa):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = tfa.create_block_mask(mask_mod, B, H, L, S, device="cpu") if mask_mod is not None else None
        out, aux = tfa.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=gqa,
                                      return_aux=tfa.AuxRequest(lse=True))
    return out, aux.lse, bm


# CPU only, the comparisons with torch's FlexAttention below: they run torch's eager flex_attention on the CPU
# (the float64-oracle tests further down and test_flex_runs_on_every_device_with_gradients take the device)
SCORES = list(_score_mods(4, 8, 8, torch.Generator().manual_seed(0)))
MASKS = list(_mask_mods(8, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("L,S,Hq,Hkv", [(200, 200, 2, 2), (150, 190, 4, 2)], ids=["self-200", "cross-150x190-gqa"])
@pytest.mark.parametrize("score_name", SCORES)
def test_score_mods_match_torch_flex_forward(score_name, L, S, Hq, Hkv, gen):
    mods = _score_mods(Hq, L, S, gen)
    mod = mods[score_name][0]
    with torch.no_grad():
        q, k, v = _qkv(2 if score_name == "batch_bias" else 1, Hq, Hkv, L, S, 16, torch.float32, gen)
        ours, lse = flex.flex_attention(q, k, v, score_mod=_float32(mod), enable_gqa=Hq != Hkv, return_lse=True)
        ref, ref_lse, _ = _torch_flex(q, k, v, _float32(mod), None, None, None, L, S, Hq != Hkv)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def _float32(mod):
    """A score_mod whose captured float64 tensors are read as float32 (FlexAttention runs float32 here)."""
    def f32(s, b, h, q, kv):
        return mod(s.double(), b, h, q, kv).float()
    return f32


@pytest.mark.parametrize("L,S,Hq,Hkv", [(200, 200, 2, 2), (200, 200, 4, 2)], ids=["self-200", "self-200-gqa"])
@pytest.mark.parametrize("mask_name", MASKS)
def test_mask_mods_match_torch_flex_forward(mask_name, L, S, Hq, Hkv, gen):
    mask_mod = _mask_mods(L, gen)[mask_name]
    B = 2
    with torch.no_grad():
        q, k, v = _qkv(B, Hq, Hkv, L, S, 16, torch.float32, gen)
        ref, ref_lse, tbm = _torch_flex(q, k, v, None, mask_mod, B, Hq, L, S, Hq != Hkv)
        bm = flex.create_block_mask(mask_mod, B, Hq, L, S)
        ours, lse = flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv, return_lse=True)
        from_torch = flex.flex_attention(q, k, v, block_mask=tbm, enable_gqa=Hq != Hkv)  # torch's BlockMask
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_torch, ref, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)
    if mask_name == "fully_masked_rows":
        assert ours[:, :, : L // 4].abs().max() == 0 and not finite[:, :, : L // 4].any()


def test_natten_2d_mask_matches_torch_flex_and_masks_neighborhood(gen):
    L = H_ * W_
    with torch.no_grad():
        q, k, v = _qkv(1, 2, 2, L, L, 8, torch.float32, gen)
        ref, _, _ = _torch_flex(q, k, v, None, _natten, None, None, L, L, False)
        ours = flex.flex_attention(q, k, v, block_mask=flex.create_block_mask(_natten, None, None, L, L))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    dense = flex.create_mask(_natten, None, None, L, L)[0, 0]
    assert torch.equal(masks.neighborhood(H_, W_, K_).materialize(L, L), dense)


# ---- float64: forward and gradients against the oracle, several tiles (BLOCK_SIZE=16) ---------------------

GRAD_CASES = [  # (score_mod name, mask_mod name)
    ("identity", "causal"), ("times_two", "sliding_window"), ("squared", "noop"), ("rel_bias", "causal"),
    ("alibi", "document_causal"), ("head_offset", "prefix_lm"), ("trig", "document"),
    ("tanh_softcap", "head_window"), ("batch_bias", "fully_masked_rows"), ("causal_mod", "noop"),
]


@pytest.mark.parametrize("score_name,mask_name", GRAD_CASES, ids=[f"{a}-{b}" for a, b in GRAD_CASES])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (2, 1)], ids=["mha", "gqa"])
def test_forward_and_gradients_match_float64_reference(score_name, mask_name, Hq, Hkv, gen, device):
    B, L, S = 2, 37, 37  # ragged: 3 tiles of 16 with a partial last one
    # the mods twice from the same draws: on the device for attnkit, on the CPU for the oracle
    dscore_mod, dcaptured = _score_mods(Hq, L, S, _fork(gen), device)[score_name]
    score_mod, captured = _score_mods(Hq, L, S, gen)[score_name]
    dmask_mod = _mask_mods(L, _fork(gen), device)[mask_name]
    mask_mod = _mask_mods(L, gen)[mask_name]
    q, k, v = _qkv(B, Hq, Hkv, L, S, 8, torch.float64, gen, grad=True)
    dq, dk, dv = (t.detach().to(device, copy=True).requires_grad_() for t in (q, k, v))
    bm = flex.create_block_mask(dmask_mod, B, Hq, L, S, device=device, BLOCK_SIZE=16)
    assert bm.states.numel() == 9
    out, lse = flex.flex_attention(dq, dk, dv, score_mod=dscore_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                                   return_lse=True)
    ref, ref_lse = flex_ref(q, k, v, score_mod, mask_mod)
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse.detach().cpu(), ref_lse.detach(), atol=1e-10, rtol=1e-10)
    go = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    leaves = [q, k, v, *captured]
    ours = torch.autograd.grad(out, [dq, dk, dv, *dcaptured], go.to(device), allow_unused=True)
    theirs = torch.autograd.grad(ref, leaves, go, allow_unused=True)
    for name, a, b in zip(["q", "k", "v"] + [f"captured{i}" for i in range(len(captured))], ours, theirs,
                          strict=True):
        a = torch.zeros_like(leaves[0]) if a is None and b is None else a
        a = a.cpu() if a is not None else None
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), atol=1e-9, rtol=1e-9,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_cross_attention_lengths_differ_float64(gen, device):
    B, Hq, L, S = 1, 2, 37, 50
    dscore_mod, dcaptured = _score_mods(Hq, L, S, _fork(gen), device)["rel_bias"]
    score_mod, captured = _score_mods(Hq, L, S, gen)["rel_bias"]
    q, k, v = _qkv(B, Hq, Hq, L, S, 4, torch.float64, gen, grad=True)
    dq, dk, dv = (t.detach().to(device, copy=True).requires_grad_() for t in (q, k, v))
    bm = flex.create_block_mask(lambda b, h, qi, kv: kv <= qi + 5, None, None, L, S, device=device, BLOCK_SIZE=16)
    out = flex.flex_attention(dq, dk, dv, score_mod=dscore_mod, block_mask=bm)
    ref, _ = flex_ref(q, k, v, score_mod, lambda b, h, qi, kv: kv <= qi + 5)
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), atol=1e-10, rtol=1e-10)
    g1 = torch.autograd.grad(out.sum(), [dq, dk, dv, *dcaptured])
    g2 = torch.autograd.grad(ref.sum(), [q, k, v, *captured])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-9, rtol=1e-9)


def test_gradcheck_through_score_mod_and_partial_tiles(gen, device):
    q, k, v = (t.to(device).requires_grad_() for t in _qkv(1, 2, 2, 13, 13, 3, torch.float64, gen))
    slopes = torch.rand(2, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    bm = flex.create_block_mask(lambda b, h, qi, kv: (qi >= kv) & (qi - kv < 6), None, None, 13, 13, device=device,
                                BLOCK_SIZE=4)

    def f(q, k, v, slopes):
        return flex.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + slopes[h] * (kv - qi),
                                   block_mask=bm)

    assert torch.autograd.gradcheck(f, (q, k, v, slopes))


# ---- the API and the plan (CPU only: argument checks and plans, no kernel numerics) ----------------------------

def test_api_arguments_and_return_forms(gen):
    q, k, v = _qkv(1, 2, 2, 40, 40, 8, torch.float32, gen)
    out = flex.flex_attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    out2, aux = flex.flex_attention(q, k, v, return_aux=flex.AuxRequest(lse=True))
    assert torch.equal(out, out2) and aux.lse.shape == (1, 2, 40)
    out3 = flex.flex_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out3, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="enable_gqa"):
        flex.flex_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="Q_LEN=30"):
        flex.flex_attention(q, k, v, block_mask=flex.create_block_mask(flex.noop_mask, None, None, 30, 40))
    with pytest.raises(ValueError, match="not both"):
        flex.flex_attention(q, k, v, return_lse=True, return_aux=flex.AuxRequest(lse=True))
    with pytest.raises(ValueError, match=r"\(B, H, L, E\)"):
        flex.flex_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="Q_LEN"):
        flex.create_block_mask(flex.noop_mask, None, None, -1, 4)
    for bad in (lambda s, b, h, qi, kv: s[..., :3], lambda s, b, h, qi, kv: (s > 0)):  # wrong shape, not scores
        for backend in ("tiled", "math"):
            with pytest.raises((ValueError, TypeError), match="score_mod must return"):
                attention(q, k, v, score_mod=bad, backend=backend)


def test_block_mask_is_planned_tile_by_tile_from_intervals():
    """A sliding window as a mask_mod is classified from index intervals: full tiles skip the mod, only the
    partial tiles evaluate it, and the plan equals the structured window's."""
    calls = []

    def sw(b, h, q, kv):
        calls.append(tuple(torch.broadcast_shapes(q.shape, kv.shape)) if isinstance(q, torch.Tensor) else "intervals")
        return (q - kv).abs() <= 128

    bm = flex.create_block_mask(sw, None, None, 4096, 4096)
    win = masks.window(128, 128).plan(4096, 4096, 128)
    assert torch.equal(bm.states, win.states)
    assert int((bm.states == masks.FULL).sum()) == 32 and int((bm.states == masks.PARTIAL).sum()) == 62
    # one call on interval stand-ins, then the 62 partial tiles of 128 x 128 evaluated (in one chunk)
    assert len(calls) == 2 and calls[0] == "intervals" and math.prod(calls[1]) == 62 * 128 * 128
    assert "sparsity" in repr(bm) and bm.sparsity() > 90


def test_mask_mod_it_cannot_classify_is_evaluated_exactly():
    def opaque(b, h, q, kv):  # float arithmetic: the interval stand-ins give up, tiles are evaluated
        return torch.sin(q.float()) > torch.cos(kv.float())

    bm = flex.create_block_mask(opaque, None, None, 200, 150, BLOCK_SIZE=32)
    dense = flex.create_mask(opaque, None, None, 200, 150)[0, 0]
    tiles = dense.reshape(-1).new_zeros(7 * 32, 5 * 32)
    tiles[:200, :150] = dense
    assert torch.equal(bm.states > 0, tiles.view(7, 32, 5, 32).any(3).any(1))


def test_mask_offsets_see_the_same_mask_as_the_whole_sequence(gen):
    """A shard (queries 96.. of 256, keys 64.. of 256) of causal & documents gives the rows of the full result."""
    L = 256
    docs = masks.documents([100, 60, 96]) & masks.causal()
    q, k, v = _qkv(1, 2, 2, L, L, 8, torch.float64, gen)
    full = flex.flex_attention(q, k, v, block_mask=docs.plan(L, L, 32))
    shard = docs.offset(96, 0, L=L, S=L)
    part = flex.flex_attention(q[:, :, 96:160], k, v, block_mask=shard.plan(64, L, 32))
    torch.testing.assert_close(part, full[:, :, 96:160], atol=1e-12, rtol=1e-12)
    assert torch.equal(shard.materialize(64, L), docs.materialize(L, L)[96:160])
    kshard = docs.offset(96, 64, L=L, S=L)
    assert torch.equal(kshard.plan(64, 128, 32).materialize(64, 128), docs.materialize(L, L)[96:160, 64:192])
    with pytest.raises(ValueError, match="does not fit"):
        kshard.materialize(64, 256)


def test_flex_runs_on_every_device_with_gradients(device, gen):
    """One document + causal + ALiBi case on each device at hand, against the float64 oracle on the CPU."""
    B, H, L = 2, 2, 37
    docs = torch.sort(torch.randint(0, 3, (B, L), generator=gen), dim=-1).values
    slopes = torch.rand(H, dtype=torch.float64, generator=gen)
    q, k, v = _qkv(B, H, H, L, L, 8, torch.float64, gen)
    dq, dk, dv = (t.to(device).requires_grad_() for t in (q, k, v))
    dslopes, ddocs = slopes.to(device).requires_grad_(), docs.to(device)
    bm = flex.create_block_mask(lambda b, h, qi, kv: (ddocs[b, qi] == ddocs[b, kv]) & (qi >= kv), B, None, L, L,
                                device=device, BLOCK_SIZE=16)
    out = flex.flex_attention(dq, dk, dv, block_mask=bm,
                              score_mod=lambda s, b, h, qi, kv: s + dslopes[h] * (kv - qi))
    cq, ck, cv, cs = (t.clone().requires_grad_() for t in (q, k, v, slopes))
    ref, _ = flex_ref(cq, ck, cv, lambda s, b, h, qi, kv: s + cs[h] * (kv - qi),
                      lambda b, h, qi, kv: (docs[b, qi] == docs[b, kv]) & (qi >= kv))
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), atol=1e-10, rtol=1e-10)
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    ours = torch.autograd.grad(out, (dq, dk, dv, dslopes), g.to(device))
    theirs = torch.autograd.grad(ref, (cq, ck, cv, cs), g)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mod", [flex.noop_mask, flex.or_masks(flex.noop_mask),
                                 lambda b, h, qi, kv: torch.tensor(True)], ids=["noop", "or_noop", "cpu_constant"])
def test_constant_mask_mods_give_tile_states_and_pairs_on_the_indices_device(mod):
    """A mask_mod returning a constant made on the CPU (``torch.tensor(True)``, as flex.noop_mask does) must give
    tile states and allowed pairs on the device of the indices, or planning on CUDA would mix devices. Checked on
    the meta device, which every machine has."""
    mask = masks.mask_mod(mod)
    q0 = torch.arange(0, 64, 16, device="meta")
    assert mask.tile_states(q0, q0 + 15, q0, q0 + 15, 64, 64).device.type == "meta"
    qi, kj = torch.arange(4, device="meta").view(1, 4, 1), torch.arange(5, device="meta").view(1, 1, 5)
    assert mask.allowed(qi, kj, 4, 5, 2).device.type == "meta"


def test_natten_2d_forward_and_gradients_match_float64_reference(gen, device):
    """NATTEN's 2-D mask_mod (kernel centre clamped into the grid) on a 6 x 7 grid, several tiles of 16."""
    Hg, Wg, K = 6, 7, 3
    L = Hg * Wg

    def natten(b, h, q_idx, kv_idx):
        q_x, q_y, kv_x, kv_y = q_idx // Wg, q_idx % Wg, kv_idx // Wg, kv_idx % Wg
        c_x, c_y = q_x.clamp(K // 2, (Hg - 1) - K // 2), q_y.clamp(K // 2, (Wg - 1) - K // 2)
        return ((c_x - kv_x).abs() <= K // 2) & ((c_y - kv_y).abs() <= K // 2)

    dscore_mod, dcaptured = _score_mods(2, L, L, _fork(gen), device)["rel_bias"]
    score_mod, captured = _score_mods(2, L, L, gen)["rel_bias"]
    q, k, v = _qkv(1, 2, 2, L, L, 4, torch.float64, gen, grad=True)
    dq, dk, dv = (t.detach().to(device, copy=True).requires_grad_() for t in (q, k, v))
    bm = flex.create_block_mask(natten, None, None, L, L, device=device, BLOCK_SIZE=16)
    assert torch.equal(bm.materialize(L, L).cpu(), masks.neighborhood(Hg, Wg, K).materialize(L, L))
    out = flex.flex_attention(dq, dk, dv, score_mod=dscore_mod, block_mask=bm)
    ref, _ = flex_ref(q, k, v, score_mod, natten)
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), atol=1e-10, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(out.sum(), [dq, dk, dv, *dcaptured]),
                    torch.autograd.grad(ref.sum(), [q, k, v, *captured]), strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-9, rtol=1e-9)
