"""Transformer layers against torch.nn.TransformerEncoderLayer / TransformerDecoderLayer, plus invariants:
causality through gradients, padded keys are irrelevant, window masks stay in their band."""

import pytest
import torch

from attnkit import masks
from attnkit.nn.multihead import MultiHeadAttention
from attnkit.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer

ATOL = 1e-5


def copy_from_torch(ours, theirs, attn_names):
    """Load a torch layer's weights into ours (attention through MultiHeadAttention.from_torch)."""
    with torch.no_grad():
        for name in attn_names:
            converted = MultiHeadAttention.from_torch(getattr(theirs, name))
            getattr(ours, name).load_state_dict(converted.state_dict())
        for name, mod in theirs.named_children():
            if name.startswith(("linear", "norm")):
                getattr(ours, name).load_state_dict(mod.state_dict())


def randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def causal_ignore(L):
    """torch's causal mask: True = ignore (keys after the query)."""
    return torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)


# ---------------------------------------------------------------------------------------------- torch parity
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_encoder_matches_torch(norm_first, activation):
    torch.manual_seed(0)
    B, L, E, H, F = 3, 6, 16, 4, 24
    # train mode with dropout 0 keeps torch off its fast path (which zeroes padded rows)
    t = torch.nn.TransformerEncoderLayer(E, H, F, dropout=0.0, activation=activation, batch_first=True,
                                         norm_first=norm_first)
    t = randomize(t, 1).train()
    ours = TransformerEncoderLayer(E, H, F, norm_first=norm_first, activation=activation)
    copy_from_torch(ours, t, ["self_attn"])
    x = torch.randn(B, L, E)
    lengths = torch.tensor([6, 4, 2])
    pad = torch.arange(L)[None, :] >= lengths[:, None]  # torch: True = ignore
    out_t = t(x, src_key_padding_mask=pad)
    out_o = ours(x, mask=masks.padding(lengths))
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_matches_torch(norm_first):
    torch.manual_seed(2)
    B, L, S, E, H = 2, 5, 7, 16, 2
    t = torch.nn.TransformerDecoderLayer(E, H, 32, dropout=0.0, batch_first=True, norm_first=norm_first,
                                         activation="gelu")
    t = randomize(t, 3).train()
    ours = TransformerDecoderLayer(E, H, 32, norm_first=norm_first)
    copy_from_torch(ours, t, ["self_attn", "multihead_attn"])
    x, memory = torch.randn(B, L, E), torch.randn(B, S, E)
    src_lengths = torch.tensor([7, 3])
    memory_pad = torch.arange(S)[None, :] >= src_lengths[:, None]
    out_t = t(x, memory, tgt_mask=causal_ignore(L), memory_key_padding_mask=memory_pad)
    out_o = ours(x, memory, self_mask=masks.causal(), memory_mask=masks.padding(src_lengths))
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- invariants
def test_decoder_self_attention_is_causal_through_gradients():
    torch.manual_seed(4)
    B, L, S, E, H = 2, 6, 4, 8, 2
    dec = randomize(TransformerDecoderLayer(E, H, norm_first=True), 5).double()
    x = torch.randn(B, L, E, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, S, E, dtype=torch.float64)
    out = dec(x, memory, self_mask=masks.causal())
    for i in range(L):
        (grad,) = torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)
        per_pos = grad.abs().sum(dim=(0, 2))  # (L,)
        assert (per_pos[i + 1:] == 0).all(), f"query {i} depends on later tokens: {per_pos}"
        assert (per_pos[: i + 1] > 0).all(), f"query {i} should depend on tokens 0..{i}: {per_pos}"
    # without the mask the same test fails: query 0 then depends on the future
    out = dec(x, memory)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert grad[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("norm_first", [True, False])
def test_padded_keys_are_irrelevant(norm_first):
    torch.manual_seed(6)
    B, L, E, H = 3, 7, 8, 2
    enc = randomize(TransformerEncoderLayer(E, H, norm_first=norm_first), 7).eval()
    lengths = torch.tensor([7, 5, 2])
    valid = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
    x = torch.randn(B, L, E)
    x2 = torch.where(valid[..., None], x, torch.randn(B, L, E) * 100)  # garbage in the padding
    mask = masks.padding(lengths)
    out, out2 = enc(x, mask=mask), enc(x2, mask=mask)
    torch.testing.assert_close(out[valid], out2[valid], atol=ATOL, rtol=0)
    # control: without the mask the padding leaks in
    assert not torch.allclose(enc(x)[valid], enc(x2)[valid], atol=1e-3)

    # the same for the decoder's memory
    dec = randomize(TransformerDecoderLayer(E, H, norm_first=norm_first), 8).eval()
    memory = torch.randn(B, L, E)
    memory2 = torch.where(valid[..., None], memory, torch.randn(B, L, E) * 100)
    y = torch.randn(B, 4, E)
    a = dec(y, memory, self_mask=masks.causal(), memory_mask=mask)
    b = dec(y, memory2, self_mask=masks.causal(), memory_mask=mask)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert not torch.allclose(dec(y, memory), dec(y, memory2), atol=1e-3)


def test_weights_shapes_rows_and_window_band():
    torch.manual_seed(9)
    B, L, S, E, H = 2, 9, 5, 8, 4
    enc = TransformerEncoderLayer(E, H, num_kv_heads=2)
    x = torch.randn(B, L, E)
    out, w = enc(x, mask=masks.window(2, 1), need_weights=True)
    assert out.shape == (B, L, E) and w.shape == (B, H, L, L)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    outside = (j < i - 2) | (j > i + 1)
    assert (w[..., outside] == 0).all() and (w[..., ~outside] > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, L))
    dec = TransformerDecoderLayer(E, H, memory_dim=6)
    out, sw, cw = dec(x, torch.randn(B, S, 6), self_mask=masks.causal(), need_weights=True)
    assert out.shape == (B, L, E) and sw.shape == (B, H, L, L) and cw.shape == (B, H, L, S)
    assert (sw[..., j > i] == 0).all()
    torch.testing.assert_close(cw.sum(-1), torch.ones(B, H, L))


def test_bias_reaches_the_attention():
    torch.manual_seed(10)
    enc = TransformerEncoderLayer(8, 2)
    x = torch.randn(1, 4, 8)
    bias = torch.full((1, 2, 4, 4), float(0))
    bias[..., 0] = 50.0  # every query looks at key 0
    _, w = enc(x, bias=bias, need_weights=True)
    assert (w[..., 0] > 0.99).all()


def test_errors():
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(8, 2, activation="swish")
    with pytest.raises(ValueError, match="embed_dim"):
        TransformerEncoderLayer(10, 4)
    with pytest.raises(ValueError, match="dropout"):
        TransformerDecoderLayer(8, 2, dropout=2.0)
    with pytest.raises(ValueError, match="memory"):
        TransformerDecoderLayer(8, 2)(torch.randn(1, 3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="ff_dim"):
        TransformerEncoderLayer(8, 2, ff_dim=0)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_with_a_prefix_equals_the_whole_sequence_at_the_new_positions(norm_first):
    """Incremental decoding: feeding positions P.. with the layer's earlier inputs as ``prefix`` gives exactly
    what the whole sequence gives there, one step at a time too, weights included."""
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(16, 4, 32, norm_first=norm_first).eval()
    x, memory = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    mem_mask = masks.padding(torch.tensor([5, 3, 1]))
    full, sw, cw = layer(x, memory, self_mask=masks.causal(), memory_mask=mem_mask, need_weights=True)
    part, psw, pcw = layer(x[:, 4:], memory, self_mask=masks.causal(), memory_mask=mem_mask, need_weights=True,
                           prefix=x[:, :4])
    torch.testing.assert_close(part, full[:, 4:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(psw, sw[:, :, 4:], rtol=1e-5, atol=1e-6)  # (B, H, 3, 7)
    torch.testing.assert_close(pcw, cw[:, :, 4:], rtol=1e-5, atol=1e-6)
    for t in range(7):  # one new position per call, no mask needed
        step = layer(x[:, t : t + 1], memory, memory_mask=mem_mask, prefix=x[:, :t])
        torch.testing.assert_close(step, full[:, t : t + 1], rtol=1e-5, atol=1e-6)


def test_decoder_prefix_errors():
    layer = TransformerDecoderLayer(8, 2)
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"prefix must be a \(B, P, E\) = \(2, P, 8\)"):
        layer(x, memory, prefix=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="prefix must be"):
        layer(x, memory, prefix=torch.randn(1, 3, 8))


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_step_with_kv_caches_equals_the_whole_sequence(norm_first):
    """``step`` with the memory projected once and the self-attention keys/values cached gives what the whole
    sequence gives at the new positions: one position per call from an empty cache, then a chunk of three,
    weights included, and the returned cache holds every position so far."""
    torch.manual_seed(1)
    layer = TransformerDecoderLayer(16, 4, 32, norm_first=norm_first, num_kv_heads=2).eval()
    x, memory = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    mem_mask = masks.padding(torch.tensor([5, 3, 1]))
    full, sw, cw = layer(x, memory, self_mask=masks.causal(), memory_mask=mem_mask, need_weights=True)
    mkv = layer.project_memory(memory)
    assert mkv[0].shape == (3, 2, 5, 4)
    past = None
    for t in range(4):
        out, past = layer.step(x[:, t : t + 1], mkv, past, memory_mask=mem_mask)
        torch.testing.assert_close(out, full[:, t : t + 1], rtol=1e-5, atol=1e-6)
        assert past[0].shape == past[1].shape == (3, 2, t + 1, 4)
    out, past, psw, pcw = layer.step(x[:, 4:], mkv, past, memory_mask=mem_mask, need_weights=True)
    torch.testing.assert_close(out, full[:, 4:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(psw, sw[:, :, 4:], rtol=1e-5, atol=1e-6)  # (B, H, 3, 7): causal within the chunk
    torch.testing.assert_close(pcw, cw[:, :, 4:], rtol=1e-5, atol=1e-6)
    assert past[0].shape == (3, 2, 7, 4)


def test_decoder_step_errors():
    layer = TransformerDecoderLayer(8, 2)
    x, memory = torch.randn(2, 1, 8), torch.randn(2, 4, 8)
    mkv = layer.project_memory(memory)
    with pytest.raises(ValueError, match=r"past_kv must be the pair of \(B, G, P, D\) = \(2, 2, P, 4\)"):
        layer.step(x, mkv, (torch.randn(2, 2, 3, 5), torch.randn(2, 2, 3, 5)))
    with pytest.raises(ValueError, match="past_kv must be"):
        layer.step(x, mkv, torch.randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match=r"kv must be two \(B, G, S, D\)"):
        layer.step(x, (mkv[0][:1], mkv[1][:1]))
    with pytest.raises(ValueError, match="memory must be"):
        layer.project_memory(torch.randn(4, 8))
