"""The three translators: attention weights against float64 formulas, padding, causality, step == forward."""

from __future__ import annotations

import pytest
import torch

from attnkit.tasks.translate.models import build_model

BASE = dict(src_vocab=11, tgt_vocab=13, embed_dim=8, hidden=12, num_layers=2, dropout=0.0, num_heads=3,
            ff_dim=16, max_len=64, score="general")


def make(kind, **kw):
    torch.manual_seed(0)
    return build_model({**BASE, "kind": kind, **kw}).double().eval()


def batch():
    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, 11, (3, 5), generator=g)
    lens = torch.tensor([5, 3, 1])
    tgt_in = torch.randint(4, 13, (3, 4), generator=g)
    return src, lens, tgt_in


def masked_softmax64(scores, lens):
    keep = torch.arange(scores.shape[-1]) < lens[:, None, None]  # (B, 1, S)
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)


def test_bahdanau_weights_follow_the_additive_formula():
    model = make("bahdanau")
    src, lens, tgt_in = batch()
    _, attn = model(src, lens, tgt_in)
    # float64 reference for step 0: query = top layer of the encoder's final state
    enc_out, hidden = model.encoder(src, lens)  # (B, S, H), (layers, B, H)
    a = model.attention
    q = hidden[-1]  # (B, H)
    # e_j = w_v^T tanh(W_q q + W_k h_j)
    e = torch.tanh((q @ a.W_q.weight.T)[:, None, :] + enc_out @ a.W_k.weight.T) @ a.w_v.weight[0]  # (B, S)
    want = masked_softmax64(e[:, None, :], lens)[:, 0]
    torch.testing.assert_close(attn["weights"][:, 0], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("score", ["dot", "general"])
def test_luong_weights_follow_the_formula(score):
    model = make("luong", score=score)
    src, lens, tgt_in = batch()
    _, attn = model(src, lens, tgt_in)
    enc_out, hidden = model.encoder(src, lens)
    dec_out, _ = model.rnn(model.embedding(tgt_in), hidden)  # (B, T, H)
    w = torch.eye(12, dtype=torch.float64) if score == "dot" else model.w_a
    e = dec_out @ w @ enc_out.transpose(1, 2)  # (B, T, S): s_t^T W_a h_j
    torch.testing.assert_close(attn["weights"], masked_softmax64(e, lens), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kind", "bi"), [("bahdanau", False), ("bahdanau", True), ("luong", True),
                                         ("transformer", False)])
def test_padding_is_ignored(kind, bi):
    model = make(kind, bidirectional=bi)
    src, lens, tgt_in = batch()
    logits, attn = model(src, lens, tgt_in)
    noisy = src.clone()
    noisy[1, 3:] = 7  # change only padding positions (beyond each length)
    noisy[2, 1:] = 9
    logits2, attn2 = model(noisy, lens, tgt_in)
    torch.testing.assert_close(logits2, logits)
    assert float(attn["weights"][1, :, 3:].detach().abs().max()) == 0.0  # no weight on padding
    torch.testing.assert_close(attn["weights"].sum(-1), torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["bahdanau", "luong", "transformer"])
def test_step_by_step_equals_teacher_forcing(kind):
    model = make(kind)
    src, lens, tgt_in = batch()
    logits, attn = model(src, lens, tgt_in)
    state = model.encode(src, lens)
    for t in range(tgt_in.shape[1]):
        step_logits, state, w = model.step(tgt_in[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t])
        torch.testing.assert_close(w, attn["weights"][:, t])


def test_transformer_is_causal_and_returns_every_head():
    model = make("transformer")
    src, lens, tgt_in = batch()
    logits, attn = model(src, lens, tgt_in)
    assert len(attn["layers"]) == 2 and attn["layers"][0].shape == (3, 3, 4, 5)  # (B, H, T, S)
    changed = tgt_in.clone()
    changed[:, 2] = 4
    logits2, _ = model(src, lens, changed)
    torch.testing.assert_close(logits2[:, :2], logits[:, :2])  # earlier outputs cannot see word 2
    assert not torch.allclose(logits2[:, 2:], logits[:, 2:])


def test_build_model_errors():
    with pytest.raises(ValueError, match="model kind must be one of"):
        build_model({**BASE, "kind": "lstm"})
    with pytest.raises(ValueError, match="misses"):
        build_model({"kind": "bahdanau", "hidden": 3})
    with pytest.raises(ValueError, match="score must be one of"):
        build_model({**BASE, "kind": "luong", "score": "cosine"})
