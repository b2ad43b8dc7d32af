"""The training loop: masked cross-entropy, gradient clipping, progress bar, checkpoints, exact resume.

Repeatable by construction: the model is initialised from ``seed``; the order of the training pairs in epoch
``e`` comes from a generator seeded with ``(seed, e)``; dropout draws from torch's global generator, whose state
is saved in every checkpoint together with the position inside the epoch. A run stopped anywhere (Ctrl-C, a
time limit) and resumed ends with the same weights as a run that was never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn

from attnkit.tasks.translate import checkpoint as ckpt
from attnkit.tasks.translate import vocabulary
from attnkit.tasks.translate.config import EMBEDDED, SCHEDULES, TrainConfig
from attnkit.tasks.translate.data import Pair, embedded_pairs, load_pairs, split_pairs
from attnkit.tasks.translate.errors import TranslateError
from attnkit.tasks.translate.models import build_model
from attnkit.tasks.translate.models.base import check_model_memory, token_loss
from attnkit.tasks.translate.vocab import SPECIALS, Vocab

log = logging.getLogger(__name__)
__all__ = ["EMBEDDED", "SCHEDULES", "TrainConfig", "train", "load_splits"]  # the config moved to config.py


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a function of the step alone, so resume is exact.

        lr_t = lr * min(1, (t + 1) / warmup) * (1 - t / total  if schedule == "linear" else 1)
    """
    scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "linear":
        total = max(cfg.epochs * steps_per_epoch, 1)
        scale *= max(0.0, 1.0 - step / total)
    return cfg.lr * scale


def load_splits(cfg: TrainConfig) -> dict[str, list[Pair]]:
    """The train / valid / test pairs of the run's data (deterministic from ``split_seed``)."""
    if cfg.data == EMBEDDED:
        pairs = embedded_pairs(cfg.lang)
    else:
        pairs = load_pairs(cfg.data, max_pairs=cfg.max_pairs)
    return split_pairs(pairs, seed=cfg.split_seed, valid_frac=cfg.valid_frac, test_frac=cfg.test_frac)


def model_config(cfg: TrainConfig, src_vocab: Vocab, tgt_vocab: Vocab, train_len: int = 0) -> dict:
    """The model's JSON config; its positions cover decoding (``max_len``) and training pairs (``train_len``)."""
    return {"kind": cfg.model, "src_vocab": len(src_vocab), "tgt_vocab": len(tgt_vocab),
            "embed_dim": cfg.embed_dim, "hidden": cfg.hidden, "num_layers": cfg.num_layers,
            "dropout": cfg.dropout, "num_heads": cfg.num_heads, "ff_dim": cfg.ff_dim,
            "max_len": max(256, cfg.max_len + 2, train_len + 2), "score": cfg.score,
            "bidirectional": cfg.bidirectional}


def collate(items: list[tuple[list[int], list[int]]], bos: int, eos: int, pad: int = 0):
    """Pad a batch of (source ids, target ids).

    Shape:
        - returns src ``(B, S)``, src_lens ``(B,)``, tgt_in ``(B, T)`` = ``<bos>`` y, tgt_out ``(B, T)`` = y ``<eos>``
    """
    B = len(items)
    S = max(len(s) for s, _ in items)
    T = max(len(t) for _, t in items) + 1
    src = torch.full((B, S), pad, dtype=torch.long)
    tgt_in = torch.full((B, T), pad, dtype=torch.long)
    tgt_out = torch.full((B, T), pad, dtype=torch.long)
    for b, (s, t) in enumerate(items):
        src[b, : len(s)] = torch.tensor(s)
        tgt_in[b, : len(t) + 1] = torch.tensor([bos, *t])
        tgt_out[b, : len(t) + 1] = torch.tensor([*t, eos])
    src_lens = torch.tensor([len(s) for s, _ in items])
    return src, src_lens, tgt_in, tgt_out


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, max_tokens: int | None = None,
                  costs: list[tuple[int, int]] | None = None) -> list[list[int]]:
    """The batches (lists of pair indices) of ``epoch``: a function of ``(seed, epoch)`` only.

    Pairs are shuffled, cut into pools of 50 batches, sorted by length inside a pool (less padding), cut
    into batches, and the batches shuffled again. With ``max_tokens`` and ``costs`` (per pair its source and
    target lengths), a batch whose padded size ``B * (S + T + 1)`` would exceed ``max_tokens`` is cut in
    halves until it fits, so memory per step is bounded whatever the lengths.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    pool = 50 * batch_size
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i: i + pool], key=lambda j: lengths[j])
        for k in range(0, len(chunk), batch_size):
            batches.extend(_fit(chunk[k: k + batch_size], max_tokens, costs))
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def _fit(batch: list[int], max_tokens: int | None, costs: list[tuple[int, int]] | None) -> list[list[int]]:
    if max_tokens is None or costs is None or len(batch) == 1:
        return [batch]
    padded = len(batch) * (max(costs[j][0] for j in batch) + max(costs[j][1] for j in batch) + 1)
    if padded <= max_tokens:
        return [batch]
    half = len(batch) // 2
    return _fit(batch[:half], max_tokens, costs) + _fit(batch[half:], max_tokens, costs)


def train_length_limit(cfg: TrainConfig, pairs: list[Pair]) -> int:
    """``cfg.max_train_len``, or sized for the data: 4 x the 90th percentile of the longer side, at least 64 (so
    ordinary sentences are all kept and only outliers, such as a whole document on one line, are skipped; the
    percentile ignores up to a tenth of outliers, even in a small file)."""
    if cfg.max_train_len is not None:
        return cfg.max_train_len
    longest = sorted(max(len(p.src), len(p.tgt)) for p in pairs) or [0]
    return max(64, 4 * longest[int(0.9 * (len(longest) - 1))])


def skip_long(pairs: list[Pair], limit: int) -> tuple[list[Pair], int]:
    """The pairs whose both sides have at most ``limit`` tokens, and how many were skipped."""
    kept = [p for p in pairs if len(p.src) <= limit and len(p.tgt) <= limit]
    return kept, len(pairs) - len(kept)


def _encode(pairs: list[Pair], src_vocab, tgt_vocab, positions: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """The (source ids, target ids) of ``pairs`` whose both sides fit in ``positions`` ids, and how many did not."""
    items = [(src_vocab.encode(p.src), tgt_vocab.encode(p.tgt)) for p in pairs]
    kept = [(s, t) for s, t in items if len(s) <= positions and len(t) <= positions]
    return kept, len(items) - len(kept)


def running_mean(mean: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor],
                 count: int) -> dict[str, torch.Tensor]:
    """``mean`` of ``count - 1`` weight sets updated with the ``count``-th, ``state`` (floating tensors averaged,
    others taken from ``state``): ``mean + (state - mean) / count``."""
    if mean is None or count == 1:
        return {k: v.detach().clone() for k, v in state.items()}
    return {k: (mean[k] + (v.detach() - mean[k]) / count) if v.is_floating_point() else v.detach().clone()
            for k, v in state.items()}


def masked_loss(logits: torch.Tensor, tgt_out: torch.Tensor, label_smoothing: float = 0.0):
    """Sum of cross-entropy over real (non-padding) target tokens, and their number."""
    return token_loss(logits.flatten(0, 1), tgt_out.flatten(), label_smoothing)


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one interrupts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from attnkit._progress import progress as tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


@torch.no_grad()
def valid_loss(model, items, bos, eos, batch_size) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        src, src_lens, tgt_in, tgt_out = collate(items[i: i + batch_size], bos, eos)
        loss, n = model.loss(src, src_lens, tgt_in, tgt_out)
        total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          on_step=None) -> dict:
    """Train (or resume) a translator in ``run_dir``; return ``{"status", "history", "model", ...}``.

    ``status`` is ``"done"``, ``"interrupted"`` (Ctrl-C) or ``"time limit"``; in every case the checkpoint in
    ``run_dir`` holds the last finished step. ``on_step(global_step)`` is called after every optimizer step.
    """
    from attnkit.tasks.translate import distributed
    from attnkit.tasks.translate.runlock import run_lock

    par = distributed.current()  # None on one process; under torchrun, rank 0 holds the directory (and lock)
    if par is not None and not par.is_main:
        return _train(cfg, Path(run_dir), resume=resume, progress=False, on_step=on_step, par=par)
    if par is not None:
        par.announce(cfg, resume)
    with run_lock(run_dir):  # one trainer per run directory, until this one ends (kill -9 included)
        return _train(cfg, Path(run_dir), resume=resume, progress=progress, on_step=on_step, par=par)


def _check_data(cfg: TrainConfig, splits: dict[str, list[Pair]], src_vocab: Vocab, tgt_vocab: Vocab) -> None:
    """Refuse, before training, data that leaves no training pair, no held-out sentence or no vocabulary."""
    n = sum(len(v) for v in splits.values())
    if not splits["train"]:
        raise TranslateError(f"{cfg.data}: no training pairs left after the split ({n} pairs, valid_frac "
                             f"{cfg.valid_frac}, test_frac {cfg.test_frac})")
    if not splits["test"]:
        raise TranslateError(f"{cfg.data}: {n} pairs are too few for a held-out test split of test_frac "
                             f"{cfg.test_frac} (it rounds to 0 source sentences); use more data or a larger "
                             "--test-frac")
    for side, vocab in (("source", src_vocab), ("target", tgt_vocab)):
        if isinstance(vocab, Vocab) and len(vocab) == len(SPECIALS):
            raise TranslateError(f"{cfg.data}: min_freq {cfg.min_freq} keeps no {side} word of the training "
                                 "split (every word is rarer); lower --min-freq")


def _train(cfg: TrainConfig, run_dir: Path, *, resume: bool, progress: bool, on_step, par=None) -> dict:
    if resume:
        meta, tensors = ckpt.load_checkpoint(run_dir)
        if par is not None:
            par.barrier()  # every rank has read the checkpoint before rank 0 tidies the directory
        if par is None or par.is_main:
            ckpt.collect_garbage(run_dir)  # what a killed trainer left behind (we hold the lock)
        saved = TrainConfig.from_dict(meta["train"])
        cfg = dataclasses.replace(saved, epochs=cfg.epochs, max_minutes=cfg.max_minutes)
        src_vocab, tgt_vocab = vocabulary.from_meta(meta["src_vocab"]), vocabulary.from_meta(meta["tgt_vocab"])
    splits = load_splits(cfg)
    limit = train_length_limit(cfg, splits["train"])
    splits["train"], skipped_train = skip_long(splits["train"], limit)
    splits["valid"], skipped_valid = skip_long(splits["valid"], limit)
    skipped = {"max_train_len": limit, "train": skipped_train, "valid": skipped_valid}
    if skipped_train or skipped_valid:
        log.warning("skipped %d training and %d validation pairs longer than %d tokens (--max-train-len)",
                    skipped_train, skipped_valid, limit)
    if not resume:
        src_vocab, tgt_vocab = (vocabulary.build(cfg.vocab, [getattr(p, side) for p in splits["train"]],
                                                 min_freq=cfg.min_freq, vocab_size=cfg.vocab_size)
                                for side in ("src", "tgt"))
        if par is not None:  # one vocabulary for all ranks: rank 0's (a subword one is learned, not counted)
            shared = par.share([vocabulary.to_meta(src_vocab), vocabulary.to_meta(tgt_vocab)])
            src_vocab, tgt_vocab = (vocabulary.from_meta(v) for v in shared)
    _check_data(cfg, splits, src_vocab, tgt_vocab)
    mcfg = model_config(cfg, src_vocab, tgt_vocab, limit)
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else cfg.batch_size * (2 * limit + 1)
    if max_tokens < 2 * limit + 1:
        raise TranslateError(f"max_tokens {max_tokens} cannot hold one pair of {limit} tokens per side "
                             f"(--max-train-len); give --max-tokens >= {2 * limit + 1}")
    try:
        check_model_memory(mcfg, copies=4)  # weights, gradients and Adam's two moments
    except ValueError as exc:
        raise TranslateError(f"{cfg.data}: {exc}") from None
    bos, eos = tgt_vocab.bos_id, tgt_vocab.eos_id
    # a subword vocabulary spells a rare word in several ids: a pair may need more positions than its words
    positions = mcfg["max_len"] - 2
    train_items, over = _encode(splits["train"], src_vocab, tgt_vocab, positions)
    valid_items, over_valid = _encode(splits["valid"], src_vocab, tgt_vocab, positions)
    if over or over_valid:
        log.warning("skipped %d training and %d validation pairs longer than %d ids (the model's positions)",
                    over, over_valid, positions)
        skipped["train"] += over
        skipped["valid"] += over_valid
    if not train_items:
        raise TranslateError(f"{cfg.data}: every training pair is longer than the model's {positions} positions")

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    loss_of = model.loss if par is None else par.wrap(model)  # DistributedDataParallel under torchrun
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    epoch, start, history, sums = 0, 0, [], {"loss": 0.0, "tokens": 0}
    global_step = 0
    average, averaged = None, 0  # running mean of the weights at the ends of the last cfg.average_last epochs
    if resume:
        ckpt.load_model_weights(model, tensors, run_dir / ckpt.MANIFEST)
        opt_state = ckpt.optimizer_state(tensors, meta)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        torch.set_rng_state(tensors["rng.torch"])
        prog = meta["progress"]
        epoch, start, global_step = prog["epoch"], prog["step"], prog["global_step"]
        sums = prog["sums"]
        history = meta.get("history", [])
        average, averaged = ckpt.averaged_state(tensors), int(prog.get("averaged", 0))
        if (average is None) != (averaged == 0):
            raise TranslateError(f"{run_dir / ckpt.MANIFEST}: progress.averaged {averaged} does not match the "
                                 "averaged weights it holds")

    def save(status: str) -> None:
        if par is not None and not par.is_main:
            return
        meta_out = {"train": dataclasses.asdict(cfg), "model": mcfg, "src_vocab": vocabulary.to_meta(src_vocab),
                    "tgt_vocab": vocabulary.to_meta(tgt_vocab), "history": history, "status": status,
                    "progress": {"epoch": epoch, "step": start, "global_step": global_step, "sums": sums,
                                 "averaged": averaged}}
        ckpt.save_checkpoint(run_dir, model=model, optimizer=optimizer, meta=meta_out, average=average)

    lengths = [len(s) + len(t) for s, t in train_items]
    costs = [(len(s), len(t)) for s, t in train_items]
    # the schedule's steps per epoch (epochs cut by --max-tokens may differ by a few batches)
    steps_per_epoch = len(epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, max_tokens, costs))
    t0 = time.perf_counter()
    status = "done"
    model.train()
    with _StopFlag() as stop:
        while epoch < cfg.epochs and status == "done":
            batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, max_tokens, costs)
            n_batches = len(batches)
            bar = _progress(n_batches, start, f"epoch {epoch + 1}/{cfg.epochs}", progress)
            t_epoch, tokens_epoch = time.perf_counter(), 0
            for b in range(start, n_batches):
                batch = [train_items[i] for i in batches[b]]
                if par is not None:
                    batch = par.shard(batch)
                src, src_lens, tgt_in, tgt_out = collate(batch, bos, eos)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, global_step, steps_per_epoch)
                loss, n_tok = loss_of(src, src_lens, tgt_in, tgt_out, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if par is None:
                    (loss / n_tok).backward()
                else:  # this rank's share of the global batch's mean; the global loss sum and token count
                    loss, n_tok = par.backward(loss, n_tok)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                optimizer.step()
                global_step += 1
                start = b + 1
                sums = {"loss": sums["loss"] + float(loss.detach()), "tokens": sums["tokens"] + n_tok}
                tokens_epoch += n_tok
                if bar is not None:
                    rate = tokens_epoch / max(time.perf_counter() - t_epoch, 1e-9)
                    bar.set_postfix(loss=f"{sums['loss'] / max(sums['tokens'], 1):.3f}", tok_s=f"{rate:.0f}",
                                    refresh=False)  # drawn by update(), at the bar's pace
                    bar.update(1)
                if on_step is not None:
                    on_step(global_step)
                if stop.requested:
                    status = "interrupted"
                elif cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                    status = "time limit"
                if par is not None:
                    status = par.agree(status)  # every rank stops after the same step
                if status != "done" and start < n_batches:
                    break
            if bar is not None:
                bar.close()
            if start == n_batches:  # the epoch is complete
                entry = {"epoch": epoch + 1, "train_loss": sums["loss"] / max(sums["tokens"], 1),
                         "seconds": round(time.perf_counter() - t_epoch, 2)}
                if valid_items:
                    entry["valid_loss"] = valid_loss(model, valid_items, bos, eos, 4 * cfg.batch_size)
                if cfg.average_last and epoch + 1 > cfg.epochs - cfg.average_last:
                    averaged += 1
                    average = running_mean(average, model.state_dict(), averaged)
                    entry["averaged_epochs"] = averaged
                history.append(entry)
                log.info("epoch %d: %s", epoch + 1, entry)
                epoch, start, sums = epoch + 1, 0, {"loss": 0.0, "tokens": 0}
            save(status if status != "done" or epoch < cfg.epochs else "done")
    if average is not None:  # evaluate (and hand back) the average of the last epochs' weights
        model.load_state_dict(average)
    model.eval()
    return {"status": status, "history": history, "model": model, "src_vocab": src_vocab, "skipped": skipped,
            "tgt_vocab": tgt_vocab, "config": cfg, "splits": splits,
            "train_seconds": time.perf_counter() - t0}
