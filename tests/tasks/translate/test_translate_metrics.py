"""BLEU against a plain re-implementation of Papineni et al.'s formula; exact match; alignment accuracy."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from attnkit.tasks.translate.metrics import alignment_accuracy, corpus_bleu, exact_match


def reference_bleu(hyps, refs, max_n=4):
    """Corpus BLEU: clipped n-gram precisions (n = 1..4), geometric mean, brevity penalty (closest ref)."""
    match = [0] * max_n
    total = [0] * max_n
    hyp_len = ref_len = 0
    for h, rs in zip(hyps, refs, strict=True):
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            best = Counter()
            for r in rs:
                best |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    log_p = sum(math.log(m / t) for m, t in zip(match, total, strict=True)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)


def test_bleu_matches_the_formula_with_several_references():
    hyps = [["the", "cat", "sat", "on", "the", "mat", "."], ["il", "fait", "très", "beau", "aujourd'hui", "."],
            ["je", "suis", "chez", "moi", "."]]
    refs = [[["the", "cat", "is", "on", "the", "mat", "."], ["there", "is", "a", "cat", "on", "the", "mat", "."]],
            [["il", "fait", "beau", "aujourd'hui", "."]],
            [["je", "suis", "à", "la", "maison", "."], ["je", "suis", "chez", "moi", "."]]]
    want = reference_bleu(hyps, refs)
    assert 20 < want < 95  # a case where every n-gram order has matches and misses
    assert corpus_bleu(hyps, refs) == pytest.approx(want, rel=1e-9)


def test_bleu_extremes_and_errors():
    s = ["je", "suis", "chez", "moi", "."]
    assert corpus_bleu([s] * 3, [[s]] * 3) == pytest.approx(100.0)
    assert corpus_bleu([["x", "y", "z", "w"]], [[["a", "b", "c", "d"]]]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same length"):
        corpus_bleu([["a"]], [])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu([["a"]], [[]])


def test_exact_match_any_reference():
    hyps = [["va", "!"], ["cours", "!"], ["bonjour"]]
    refs = [[["va", "!"]], [["courez", "!"], ["cours", "!"]], [["salut", "."]]]
    assert exact_match(hyps, refs) == pytest.approx(2 / 3)


def test_alignment_accuracy_counts_argmax_in_gold_set():
    w1 = torch.tensor([[0.7, 0.2, 0.1],   # word 0 -> source 0 (gold 0): hit
                       [0.1, 0.3, 0.6],   # word 1 -> source 2 (gold 1 or 2): hit
                       [0.5, 0.4, 0.1],   # word 2 -> source 0 (gold 1): miss
                       [0.2, 0.2, 0.6]])  # <eos> row: ignored
    w2 = torch.tensor([[0.1, 0.9], [0.8, 0.2]])  # word 0 -> 1 (gold 1) hit; word 1 has no gold: skipped
    assert alignment_accuracy([w1, w2], [[(0,), (1, 2), (1,)], [(1,), ()]]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="T >= 3"):
        alignment_accuracy([w1[:2]], [[(0,), (1,), (2,)]])
