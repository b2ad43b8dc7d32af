"""Scores for translations: corpus BLEU (sacrebleu), exact match, attention alignment accuracy."""

from __future__ import annotations

import torch


def corpus_bleu(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """Corpus BLEU (0-100) of token lists against one or more reference token lists per sentence.

    Computed by sacrebleu on the tokens joined by spaces with ``tokenize="none"``, so every language (CJK
    included, one token per character) is scored on the same tokens the model produced; sentences may have
    different numbers of references (Tatoeba lists several translations of one sentence). ``force=True``: the
    input is tokenized on purpose, so sacrebleu's "forgot to detokenize" warning does not apply.

    Shape:
        - hyps: N token lists; refs: N lists of reference token lists (at least one each)
    """
    import sacrebleu

    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} and {len(refs)}")
    if not hyps:
        raise ValueError("hyps must hold at least one sentence, got none")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every sentence needs at least one reference, got an empty reference list")
    width = max(len(r) for r in refs)
    streams = [[" ".join(r[i]) if i < len(r) else None for r in refs] for i in range(width)]
    return float(sacrebleu.corpus_bleu([" ".join(h) for h in hyps], streams, tokenize="none", force=True).score)


def exact_match(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """Fraction of sentences whose output equals one of its references, token for token."""
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"hyps and refs must be non-empty and of equal length, got {len(hyps)} and {len(refs)}")
    return sum(any(h == r for r in rs) for h, rs in zip(hyps, refs, strict=True)) / len(hyps)


def alignment_accuracy(weights: list[torch.Tensor], gold: list[list[tuple[int, ...]]]) -> float:
    """How often the attention argmax of an output word lands on (one of) its gold source word(s).

    ``weights[i]`` is ``(T_i, S_i)`` for sentence i (rows: output words, teacher-forced on the reference;
    extra rows such as the one for ``<eos>`` are ignored); ``gold[i][t]`` the source positions of word t.
    Returns the fraction over all output words that have a gold alignment.
    """
    if len(weights) != len(gold):
        raise ValueError(f"weights and gold must have the same length, got {len(weights)} and {len(gold)}")
    hit = total = 0
    for w, g in zip(weights, gold, strict=True):
        if w.dim() != 2 or w.shape[0] < len(g):
            raise ValueError(f"weights must be (T, S) with T >= {len(g)} output words, got {tuple(w.shape)}")
        best = w[: len(g)].argmax(-1).tolist()
        for b, positions in zip(best, g, strict=True):
            if positions:
                total += 1
                hit += b in positions
    if total == 0:
        raise ValueError("gold holds no aligned output word")
    return hit / total


def standard_scores(hyps: list[str], refs: list[list[str]]) -> dict:
    """sacreBLEU's standard corpus scores of detokenized text: BLEU with its ``13a`` tokenizer and chrF, both
    case-insensitive (the models here write lowercase), against one or more references per sentence. Returns
    ``{"bleu_13a", "bleu_13a_signature", "chrf", "chrf_signature"}``.

    Shape:
        - hyps: N sentences; refs: N lists of reference sentences (at least one each)
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"hyps and refs must be non-empty and of equal length, got {len(hyps)} and {len(refs)}")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every sentence needs at least one reference, got an empty reference list")
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    bleu, chrf = BLEU(tokenize="13a", lowercase=True), CHRF(lowercase=True)
    b, c = bleu.corpus_score(hyps, streams), chrf.corpus_score(hyps, streams)
    return {"bleu_13a": float(b.score), "bleu_13a_signature": str(bleu.get_signature()),
            "chrf": float(c.score), "chrf_signature": str(chrf.get_signature())}
