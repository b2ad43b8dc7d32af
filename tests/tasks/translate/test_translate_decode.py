"""Greedy and beam search on a toy model whose probabilities are known, against brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnkit.tasks.translate.decode import beam_search, beam_search_batch, greedy
from attnkit.tasks.translate.models.base import Seq2Seq

V, BOS, EOS = 6, 1, 2


class Toy(Seq2Seq):
    """p(y_t | y_{t-1}) from a fixed table (a bigram model); attention = one-hot on position t mod S."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g) * 2  # (V, V): row = previous token

    def encode(self, src, src_lens):
        return (src_lens.clone(), torch.zeros(src.shape[0], dtype=torch.long), torch.zeros(src.shape[0], src.shape[1]))

    def step(self, y_prev, state):
        lens, t, blank = state
        w = torch.nn.functional.one_hot(t % lens, blank.shape[1]).float()  # (B, S)
        return self.table[y_prev], (lens, t + 1, blank), w


def logp(table, seq):
    lp = table.log_softmax(-1)
    prev, total = BOS, 0.0
    for tok in seq:
        total += float(lp[prev, tok])
        prev = tok
    return total


def brute_force(table, max_len, length_penalty=0.0):
    """Most likely output: any words then <eos> (at most max_len steps), or max_len words; never <pad> (0) or
    <bos>, which a decoder does not emit."""
    best = (float("-inf"), None)
    words = [v for v in range(V) if v not in (EOS, 0, BOS)]
    for n in range(max_len + 1):
        for seq in itertools.product(words, repeat=n):
            full = list(seq) + [EOS] if n < max_len else list(seq)
            best = max(best, (logp(table, full) / len(full) ** length_penalty, list(seq)), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("seed", range(6))
def test_wide_beam_finds_the_most_likely_output(seed):
    model = Toy(seed)
    src, lens = torch.zeros(1, 3, dtype=torch.long), torch.tensor([3])
    want_score, want_seq = brute_force(model.table, max_len=4)
    seq, att, score = beam_search(model, src, lens, bos=BOS, eos=EOS, max_len=4, beam_size=V ** 4)
    assert seq == want_seq
    assert score == pytest.approx(want_score, abs=1e-5)
    assert att.shape[1] == 3 and att.shape[0] == min(len(seq) + 1, 4)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_follows_the_argmax_chain_and_equals_beam_one(seed):
    model = Toy(seed)
    src, lens = torch.zeros(2, 4, dtype=torch.long), torch.tensor([4, 2])
    ids, weights = greedy(model, src, lens, bos=BOS, eos=EOS, max_len=5)
    chain, prev = [], BOS
    for _ in range(5):
        row = model.table[prev].clone()
        row[[0, BOS]] = float("-inf")  # never <pad> or <bos>
        prev = int(row.argmax())
        if prev == EOS:
            break
        chain.append(prev)
    assert ids == [chain, chain]
    assert weights[1].shape == (min(len(chain) + 1, 5), 2)  # trimmed to the sentence's length
    assert torch.equal(weights[1][0], torch.tensor([1.0, 0.0]))
    one, _, _ = beam_search(model, src[:1], lens[:1], bos=BOS, eos=EOS, max_len=5, beam_size=1)
    assert one == chain


def test_beam_is_never_worse_than_greedy():
    for seed in range(10):
        model = Toy(100 + seed)
        src, lens = torch.zeros(1, 2, dtype=torch.long), torch.tensor([2])
        g, _ = greedy(model, src, lens, bos=BOS, eos=EOS, max_len=6)
        b, _, score = beam_search(model, src, lens, bos=BOS, eos=EOS, max_len=6, beam_size=4)
        g_full = g[0] + ([EOS] if len(g[0]) < 6 else [])
        assert score >= logp(model.table, g_full) - 1e-6


def test_decode_argument_errors():
    model = Toy(0)
    src, lens = torch.zeros(2, 2, dtype=torch.long), torch.tensor([2, 2])
    with pytest.raises(ValueError, match=r"src must be \(1, S\)"):
        beam_search(model, src, lens, bos=BOS, eos=EOS, max_len=3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src[:1], lens[:1], bos=BOS, eos=EOS, max_len=3, beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy(model, src, lens, bos=BOS, eos=EOS, max_len=0)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 0.6])
@pytest.mark.parametrize("seed", range(4))
def test_batched_wide_beam_finds_the_best_ranked_output_for_every_sentence(seed, length_penalty):
    model = Toy(seed)
    src, lens = torch.zeros(3, 3, dtype=torch.long), torch.tensor([3, 1, 2])
    want_score, want_seq = brute_force(model.table, max_len=4, length_penalty=length_penalty)
    found = beam_search_batch(model, src, lens, bos=BOS, eos=EOS, max_len=4, beam_size=V ** 4,
                              length_penalty=length_penalty)
    for (seq, att, score), n in zip(found, lens.tolist(), strict=True):
        assert seq == want_seq
        assert score == pytest.approx(want_score, abs=1e-5)
        full = seq + ([EOS] if len(seq) < 4 else [])
        assert score == pytest.approx(logp(model.table, full) / len(full) ** length_penalty, abs=1e-5)
        assert att.shape == (min(len(seq) + 1, 4), n)


@pytest.mark.parametrize("seed", range(4))
def test_batched_beam_of_one_is_greedy(seed):
    model = Toy(seed)
    src, lens = torch.zeros(2, 4, dtype=torch.long), torch.tensor([4, 2])
    ids, weights = greedy(model, src, lens, bos=BOS, eos=EOS, max_len=5)
    found = beam_search_batch(model, src, lens, bos=BOS, eos=EOS, max_len=5, beam_size=1)
    assert [f[0] for f in found] == ids
    for (_, att, _), w in zip(found, weights, strict=True):
        assert torch.equal(att, w)


@pytest.mark.parametrize("kind", ["transformer", "bahdanau"])
def test_batched_beam_gives_each_sentence_what_it_gets_alone(kind):
    """A real model with a key/value cache: reordering the batch x beam rows keeps every sentence's state."""
    from attnkit.tasks.translate.models import build_model

    torch.manual_seed(0)
    model = build_model({"kind": kind, "src_vocab": 11, "tgt_vocab": 9, "embed_dim": 8, "hidden": 16,
                         "num_layers": 2, "dropout": 0.0, "num_heads": 2, "ff_dim": 16, "max_len": 64,
                         "score": "general", "bidirectional": False}).eval()
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([5, 2, 7, 3])
    src = torch.randint(4, 11, (4, 7), generator=g) * (torch.arange(7) < lens[:, None])
    together = beam_search_batch(model, src, lens, bos=1, eos=2, max_len=8, beam_size=3)
    for b in range(4):
        ((seq, att, score),) = beam_search_batch(model, src[b: b + 1, : lens[b]], lens[b: b + 1], bos=1, eos=2,
                                                 max_len=8, beam_size=3)
        assert together[b][0] == seq
        assert together[b][2] == pytest.approx(score, abs=1e-5)
        torch.testing.assert_close(together[b][1], att, atol=1e-5, rtol=0)
