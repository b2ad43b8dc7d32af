"""Turning a trained model into output words: greedy search and beam search."""

from __future__ import annotations

import torch

from attnkit.tasks.translate.models.base import Seq2Seq

PAD = 0  # the padding id of every vocabulary here


def _never_pad_or_bos(logits: torch.Tensor, bos: int) -> torch.Tensor:
    """``<pad>`` and ``<bos>`` are never outputs: an untrained model that ranks them first would otherwise give
    output ids that decode to fewer words than it took steps (and attention rows)."""
    logits = logits.clone()
    logits[..., PAD] = float("-inf")
    logits[..., bos] = float("-inf")
    return logits


@torch.no_grad()
def greedy(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, *, bos: int, eos: int,
           max_len: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Pick the most likely word at each step, for a whole batch at once.

    Returns per sentence the output ids (without ``<eos>``) and the attention ``(T_i, S_i)`` of each output
    step (the step that produced ``<eos>`` included when there is one).

    Shape:
        - src ``(B, S)``, src_lens ``(B,)``
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    B = src.shape[0]
    state = model.encode(src, src_lens)
    y = torch.full((B,), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    ids, weights = [], []
    for _ in range(max_len):
        logits, state, w = model.step(y, state)  # (B, V), state, (B, S)
        y = _never_pad_or_bos(logits, bos).argmax(-1)  # (B,)
        ids.append(torch.where(done, torch.full_like(y, eos), y))
        weights.append(w)
        done |= y == eos
        if bool(done.all()):
            break
    ids_t = torch.stack(ids, 1).tolist()  # (B, T)
    w_t = torch.stack(weights, 1)  # (B, T, S)
    out_ids, out_w = [], []
    for b in range(B):
        seq = ids_t[b]
        n = seq.index(eos) if eos in seq else len(seq)
        out_ids.append(seq[:n])
        steps = min(n + 1, len(seq))
        out_w.append(w_t[b, :steps, : int(src_lens[b])])
    return out_ids, out_w


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, *, bos: int, eos: int,
                max_len: int, beam_size: int = 4, length_penalty: float = 0.0
                ) -> tuple[list[int], torch.Tensor, float]:
    """Keep the ``beam_size`` best prefixes at each step; return the best finished hypothesis.

    Hypotheses are ranked by ``log p(y) / len(y) ** length_penalty`` (``len`` counts ``<eos>``); with
    ``length_penalty = 0`` the plain log-probability, so a beam as wide as all prefixes finds the most likely
    output of at most ``max_len`` words exactly. A hypothesis that reaches ``max_len`` without ``<eos>`` is
    kept as finished.

    Returns ``(ids without <eos>, attention (T, S), score)`` for the one sentence in ``src (1, S)``.
    """
    if src.shape[0] != 1:
        raise ValueError(f"beam_search decodes one sentence: src must be (1, S), got {tuple(src.shape)}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    S = int(src_lens[0])
    state = model.encode(src, src_lens)
    seqs = [[]]  # live prefixes
    logps = torch.zeros(1)
    hist = torch.zeros(1, 0, S)  # (K, t, S) attention of each live prefix
    y = torch.full((1,), bos, dtype=torch.long)
    finished: list[tuple[float, list[int], torch.Tensor]] = []

    def rank(logp: float, length: int) -> float:
        return logp / (length ** length_penalty) if length_penalty else logp

    for t in range(max_len):
        logits, state, w = model.step(y, state)  # (K, V), state, (K, S_pad)
        hist = torch.cat([hist, w[:, None, :S].float()], dim=1)  # (K, t + 1, S)
        # the model's own log-probabilities; <pad>/<bos> are only taken out of the choice
        cand = _never_pad_or_bos(logps[:, None] + logits.float().log_softmax(-1), bos).flatten()  # (K * V)
        V = logits.shape[-1]
        order = cand.argsort(descending=True)
        keep_rows, keep_tok, keep_lp = [], [], []
        for idx in order.tolist():
            row, tok = divmod(idx, V)
            lp = float(cand[idx])
            if tok == eos or t == max_len - 1:
                seq = seqs[row] if tok == eos else seqs[row] + [tok]
                finished.append((rank(lp, t + 1), seq, hist[row]))
            else:
                keep_rows.append(row)
                keep_tok.append(tok)
                keep_lp.append(lp)
            if len(keep_rows) == beam_size or (t == max_len - 1 and len(finished) >= beam_size):
                break
        if not keep_rows:
            break
        # with no length penalty scores only fall, so a finished hypothesis that beats every live one wins
        best_done = max((f[0] for f in finished), default=float("-inf"))
        if length_penalty == 0 and best_done >= max(keep_lp):
            break
        if length_penalty and len(finished) >= beam_size:
            break
        index = torch.tensor(keep_rows)
        state = model.reorder_state(state, index)
        hist = hist.index_select(0, index)
        seqs = [seqs[r] + [tok] for r, tok in zip(keep_rows, keep_tok, strict=True)]
        logps = torch.tensor(keep_lp)
        y = torch.tensor(keep_tok, dtype=torch.long)
    score, seq, att = max(finished, key=lambda f: f[0])
    return seq, att, score


@torch.no_grad()
def beam_search_batch(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, *, bos: int, eos: int,
                      max_len: int, beam_size: int = 4, length_penalty: float = 1.0
                      ) -> list[tuple[list[int], torch.Tensor, float]]:
    """Beam search for a whole batch at once (``B x beam_size`` rows through the decoder per step).

    Each sentence keeps its ``beam_size`` best prefixes by log-probability; a prefix that has produced ``<eos>``
    stays in its beam unchanged (it extends only by ``<eos>``, at no cost). At the end each sentence returns the
    beam with the best ``log p(y) / len(y) ** length_penalty`` (``len`` counts ``<eos>``; ``length_penalty = 1``
    is the average log-probability per word, fairseq's default; ``0`` the plain log-probability). With
    ``beam_size = 1`` this is greedy decoding.

    Returns per sentence ``(ids without <eos>, attention (T, S_i), score)``; the attention has a row per output
    word plus one for ``<eos>`` when it was produced.

    Shape:
        - src ``(B, S)``, src_lens ``(B,)``
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    B, K = src.shape[0], beam_size
    state = model.reorder_state(model.encode(src, src_lens), torch.arange(B).repeat_interleave(K))
    logps = torch.full((B, K), float("-inf"))
    logps[:, 0] = 0.0  # all K rows start as the same empty prefix: only one of them may be extended first
    tokens = torch.zeros(B * K, 0, dtype=torch.long)  # (B K, t)
    hist = torch.zeros(B * K, 0, src.shape[1])  # (B K, t, S) attention of each prefix
    done = torch.zeros(B * K, dtype=torch.bool)
    lengths = torch.zeros(B * K)  # words of each prefix, <eos> included
    y = torch.full((B * K,), bos, dtype=torch.long)
    for _ in range(max_len):
        logits, state, w = model.step(y, state)  # (B K, V), state, (B K, S)
        V = logits.shape[-1]
        lp = _never_pad_or_bos(logits.float().log_softmax(-1), bos)  # (B K, V)
        stay = torch.full_like(lp, float("-inf"))
        stay[:, eos] = 0.0
        lp = torch.where(done[:, None], stay, lp)
        cand = (logps.view(B * K, 1) + lp).view(B, K * V)  # (B, K V)
        top, index = cand.topk(K, dim=-1)  # (B, K)
        row = (index // V + torch.arange(B)[:, None] * K).flatten()  # (B K,) the prefix each new one extends
        tok = (index % V).flatten()  # (B K,)
        was_done = done.index_select(0, row)
        state = model.reorder_state(state, row)
        w = w.float().index_select(0, row)
        w = torch.where(was_done[:, None], torch.zeros_like(w), w)  # a finished prefix attends nowhere new
        hist = torch.cat([hist.index_select(0, row), w[:, None]], dim=1)
        tokens = torch.cat([tokens.index_select(0, row), tok[:, None]], dim=1)
        lengths = lengths.index_select(0, row) + (~was_done).float()
        done = was_done | (tok == eos)
        logps = top
        y = tok
        if bool(done.all()):
            break
    score = logps.flatten() / lengths.clamp_min(1) ** length_penalty if length_penalty else logps.flatten()
    best = score.view(B, K).argmax(-1) + torch.arange(B) * K  # (B,)
    out = []
    for b, r in enumerate(best.tolist()):
        seq = tokens[r].tolist()
        n = seq.index(eos) if eos in seq else len(seq)
        steps = min(n + 1, len(seq))
        out.append((seq[:n], hist[r, :steps, : int(src_lens[b])], float(score[r])))
    return out
