"""Greedy and beam search on a toy model whose probabilities are known, against brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnkit.tasks.translate.decode import beam_search, greedy
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


def brute_force(table, max_len):
    """Most likely output: any words then <eos> (at most max_len steps), or max_len words; never <pad> (0) or
    <bos>, which a decoder does not emit."""
    best = (float("-inf"), None)
    words = [v for v in range(V) if v not in (EOS, 0, BOS)]
    for n in range(max_len + 1):
        for seq in itertools.product(words, repeat=n):
            full = list(seq) + [EOS] if n < max_len else list(seq)
            best = max(best, (logp(table, full), list(seq)), key=lambda x: x[0])
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
