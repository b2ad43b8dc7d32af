"""``attnkit translate train|eval|predict``: the command line of the translation job.

User mistakes (a bad data file, a corrupt or mismatched checkpoint, unknown words) print one line on stderr
naming the file/line and what was wrong, and return a non-zero exit code; no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from attnkit import _argtypes as A

DEFAULT_RUN = "runs/translate"

# Defaults by (data kind, model); any option given on the command line wins.
PRESETS = {
    # 4 epochs: exact match ~100 % from epoch 3; training longer keeps exact match but the attention drifts
    # (the month gets read from the last annotation of the one-way encoder), see the package README notes
    ("embedded", "rnn"): dict(embed_dim=32, hidden=64, num_layers=1, dropout=0.1, epochs=4, batch_size=32,
                              lr=5e-3),
    ("embedded", "transformer"): dict(hidden=64, num_heads=4, ff_dim=128, num_layers=2, dropout=0.1,
                                      epochs=10, batch_size=32, lr=1e-3),
    ("file", "rnn"): dict(embed_dim=256, hidden=256, num_layers=2, dropout=0.2, epochs=10, batch_size=64,
                          lr=5e-3, min_freq=2, vocab="subword", vocab_size=8000, max_len=100),
    # sized for 30 minutes on 2 cores over the 65k Tatoeba training pairs: 4,000 subwords a side (the output layer
    # is most of the work: 1.5x the sentences per second of 8,000) and batches of 128 (1.3x again), warm-up, then
    # linear decay to 0 at the end of the 14th epoch (--max-minutes 30 stops the 2-core VM about 120 steps into it,
    # the learning rate then at 7 % of its peak)
    ("file", "transformer"): dict(hidden=128, num_heads=4, ff_dim=512, num_layers=2, dropout=0.1, epochs=14,
                                  batch_size=128, lr=2e-3, warmup_steps=1000, schedule="linear", min_freq=2,
                                  label_smoothing=0.1, vocab="subword", vocab_size=4000, max_len=100,
                                  average_last=3),
}
# command-line flag -> TrainConfig field: its argparse type (validated at parse time) or its choices
_seed = A.int_at_least(0, 2**31 - 1)
OPTIONS = {
    "lang": ("fr", "de"), "max_pairs": A.positive_int, "score": ("dot", "general"), "embed_dim": A.positive_int,
    "hidden": A.positive_int, "num_layers": A.positive_int, "dropout": A.probability, "num_heads": A.positive_int,
    "ff_dim": A.positive_int, "epochs": A.positive_int, "batch_size": A.positive_int, "lr": A.positive_float,
    "warmup_steps": A.nonnegative_int, "schedule": ("constant", "linear"), "clip": A.positive_float,
    "label_smoothing": A.probability, "seed": _seed, "split_seed": _seed, "valid_frac": A.real(0.0, 1.0, max_open=True),
    "test_frac": A.open_fraction, "min_freq": A.positive_int, "max_len": A.positive_int,
    "max_minutes": A.positive_float, "max_train_len": A.positive_int, "max_tokens": A.positive_int,
    "vocab": ("word", "subword"), "vocab_size": A.int_at_least(260, 1_000_000), "average_last": A.nonnegative_int,
}
HELP = {
    "max_train_len": "skip training pairs with a side longer than this many tokens (default: sized for the data, "
                     "4 x the 90th percentile, at least 64); the count skipped is printed",
    "max_tokens": "cut a batch whose padded size (sentences x (source + target + 1) tokens) exceeds this "
                  "(default: --batch-size pairs of --max-train-len tokens)",
    "max_minutes": "stop (and save) after this much training time in this session",
    "vocab": "word: one id per word seen --min-freq times (others <unk>); subword: byte-level BPE learned from "
             "the training split, nothing is <unk> (default for a data file; the embedded task uses words)",
    "vocab_size": "subword vocabulary: ids per language (default 8000; the Transformer preset for a data file: "
                  "4000)",
    "average_last": "evaluate and keep the mean of the weights at the ends of the last N epochs (checkpoint "
                    "averaging; 0 = off)",
    "max_len": "longest output when decoding, in ids (words, or subword pieces)",
}
RESUME_MAY_CHANGE = ("epochs", "max_minutes")  # what --resume takes from the command line; the rest is the run's
_beam = A.int_at_least(1, 100)
_length_penalty = A.real(0.0, 10.0)
BEAM, LENGTH_PENALTY = 4, 1.0  # decoding defaults: beam search ranked by the average log-probability per id
_threads = A.int_at_least(1, 1024)
FLAGS = ("bidirectional",)  # store_true options that map to TrainConfig fields


def register(subparsers) -> None:
    """Add ``translate`` with its ``train``, ``eval`` and ``predict`` sub-commands."""
    p = subparsers.add_parser("translate", help="train / evaluate / use an attention translator",
                              description="Train an encoder-decoder translator with attention, evaluate it "
                                          "(BLEU, exact match, alignment) and draw where it looks.")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="translate_command", metavar="{train,eval,predict}")

    t = sub.add_parser("train", help="train a model (default: additive attention on the embedded date task)")
    t.add_argument("--data", default=None, type=A.path,
                   help="'embedded' (English dates -> French/German, no download; the default) or a "
                        "source<TAB>target file")
    t.add_argument("--model", default=None, choices=("bahdanau", "luong", "transformer"),
                   help="default: bahdanau")
    t.add_argument("--out", default=DEFAULT_RUN, type=A.path, help=f"run directory (default {DEFAULT_RUN})")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    _decoding_options(t, "the final evaluation")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--bidirectional", action="store_true", default=None,
                   help="GRU models: read the source in both directions (Bahdanau et al.)")
    t.add_argument("--threads", type=_threads, default=None,
                   help="torch threads (default: 1 for the embedded task, whose small matrices run faster on "
                        "one thread; torch's default otherwise)")
    for name, kind in OPTIONS.items():
        typed = dict(choices=kind) if isinstance(kind, tuple) else dict(type=kind)
        t.add_argument("--" + name.replace("_", "-"), default=None, dest=name, help=HELP.get(name), **typed)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained model on its held-out split (or on --data)")
    e.add_argument("--run", default=DEFAULT_RUN, type=A.path, help="run directory with checkpoint.json")
    e.add_argument("--data", default=None, type=A.path, help="evaluate on every pair of this file instead")
    _decoding_options(e, "decoding")
    e.add_argument("--out", default=None, type=A.path,
                   help="where to write metrics/samples/heatmaps (default: --run)")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("predict", help="translate sentences given as arguments or one per line on stdin")
    r.add_argument("sentences", nargs="*", help="sentences to translate (default: read stdin)")
    r.add_argument("--run", default=DEFAULT_RUN, type=A.path)
    _decoding_options(r, "decoding")
    r.add_argument("--allow-unknown", action="store_true", help="translate unknown words as <unk>")
    r.add_argument("--html", default=None, metavar="FILE", type=A.html_file,
                   help="also write an attention explorer of these sentences to FILE (.html)")
    r.set_defaults(func=cmd_predict)


def _decoding_options(p, what: str) -> None:
    p.add_argument("--beam", type=_beam, default=BEAM, help=f"beam size for {what} (default {BEAM}; 1 = greedy)")
    p.add_argument("--length-penalty", type=_length_penalty, default=LENGTH_PENALTY,
                   help=f"beam search ranks outputs by log p / length ** this (default {LENGTH_PENALTY:g}: the "
                        "average log-probability per id; 0 = plain log-probability)")


def _fail(message: str, code: int = 1) -> int:
    print(f"attnkit translate: error: {message}", file=sys.stderr)
    return code


def _guarded(fn):
    """Turn user-facing errors into one line on stderr and exit code 1."""

    def run(args) -> int:
        from attnkit.tasks.translate.errors import TranslateError

        try:
            return fn(args)
        except TranslateError as exc:
            return _fail(str(exc))
        except OSError as exc:
            return _fail(f"{exc.filename or ''}: {exc.strerror or exc}")

    run.__name__ = fn.__name__
    return run


def build_config(args, saved=None):
    """The TrainConfig of ``args``: the preset for (data, model), then every option given explicitly.

    With ``saved`` (``--resume``), the saved run's config, then only the options of ``RESUME_MAY_CHANGE``.
    A data file is recorded by its absolute path, so ``eval`` finds it from any working directory.
    """
    from attnkit.tasks.translate.config import EMBEDDED, TrainConfig

    if saved is not None:
        values = {k: getattr(args, k) for k in RESUME_MAY_CHANGE}
        return dataclasses.replace(saved, epochs=values["epochs"] or saved.epochs, max_minutes=values["max_minutes"])
    data = args.data or EMBEDDED
    if data != EMBEDDED:
        data = str(Path(data).resolve())
    model = args.model or "bahdanau"
    kind = "embedded" if data == EMBEDDED else "file"
    preset = PRESETS[(kind, "transformer" if model == "transformer" else "rnn")]
    values = {"data": data, "model": model, **preset}
    values.update({k: getattr(args, k) for k in (*OPTIONS, *FLAGS) if getattr(args, k, None) is not None})
    return TrainConfig.from_dict(values)


def _changed_on_resume(args, saved) -> list[str]:
    """The options given with ``--resume`` that differ from the saved run (``--flag value (saved X)``)."""
    out = []
    for name in ("data", "model", *OPTIONS, *FLAGS):
        given = getattr(args, name, None)
        if given is None or name in RESUME_MAY_CHANGE:
            continue
        was = getattr(saved, name)
        if name == "data" and given != "embedded":  # a first-format run may hold a relative path
            given, was = str(Path(given).resolve()), str(Path(was).resolve()) if was != "embedded" else was
        if given != was:
            flag = "--" + name.replace("_", "-")
            out.append(f"{flag} {given} (saved {getattr(saved, name)})" if name not in FLAGS else
                       f"{flag} (saved {getattr(saved, name)})")
    return out


def _print_metrics(result: dict) -> None:
    keys = [("bleu", "BLEU", "{:.1f}"), ("bleu_13a", "BLEU (sacreBLEU 13a)", "{:.1f}"), ("chrf", "chrF", "{:.1f}"),
            ("exact_match", "exact match", "{:.1%}"),
            ("alignment_accuracy", "alignment accuracy", "{:.1%}")]
    for key, label, fmt in keys:
        if key in result:
            print(f"  {label:>19}: {fmt.format(result[key])}")
    print(f"  {'held-out sentences':>19}: {result['sentences']} ({result['pairs']} pairs, {result['decoding']})")


def _print_pictures(out: Path, pictures: list) -> None:
    print(f"pictures ({len(pictures)} attention heatmaps): {out / 'heatmaps'}/")
    print(f"attention explorer (open in a browser): {out / 'attention.html'}")


@_guarded
def cmd_train(args) -> int:
    from attnkit.tasks.translate.runlock import run_lock

    if args.resume and args.overwrite:
        return _fail("--resume and --overwrite exclude each other", 2)
    if args.data not in (None, "embedded") and not Path(args.data).is_file():
        return _fail(f"{args.data}: data file not found (use --data embedded for the built-in task)")
    try:
        cfg = build_config(args)
    except (ValueError, TypeError) as exc:
        return _fail(str(exc), 2)
    from attnkit.tasks.translate import distributed

    if distributed.world_size() > 1:  # under torchrun: DistributedDataParallel, rank 0 holds --out
        return distributed.cmd_train(args, cfg, _train_locked)
    with run_lock(args.out):  # held until training ends: a second trainer on this --out is refused
        return _train_locked(args, cfg, Path(args.out))


def _train_locked(args, cfg, out: Path) -> int:
    from attnkit.tasks.translate.checkpoint import has_checkpoint, load_checkpoint, remove_checkpoint
    from attnkit.tasks.translate.config import TrainConfig
    from attnkit.tasks.translate.evaluate import evaluate, write_report
    from attnkit.tasks.translate.train import train

    again = False  # a finished run with this very config: evaluate it again instead of refusing
    if args.resume:
        meta, _ = load_checkpoint(out)
        saved = TrainConfig.from_dict(meta["train"])
        changed = _changed_on_resume(args, saved)
        if changed:
            return _fail(f"--resume continues the run saved in {out} with its own options; these differ from it: "
                         f"{', '.join(changed)}. Only --epochs and --max-minutes may change on --resume; drop "
                         "the others, or start a new run with --overwrite or another --out", 2)
        cfg = build_config(args, saved)
    elif has_checkpoint(out) and not args.overwrite:
        meta, _ = load_checkpoint(out)
        if meta.get("status") != "done" or TrainConfig.from_dict(meta["train"]) != cfg:
            return _fail(f"{out}: already holds another or an unfinished run; continue it with --resume, "
                         "start over with --overwrite, or choose another --out")
        again = args.resume = True
    elif args.overwrite:
        remove_checkpoint(out)
    threads = args.threads if args.threads is not None else (1 if cfg.data == "embedded" else None)
    if threads is not None:  # decided on the run's own data (a resumed run's, not the command line's default)
        import torch

        torch.set_num_threads(threads)
    what = f"{cfg.model} on {'the embedded date task' if cfg.data == 'embedded' else cfg.data}"
    if again:
        print(f"{out} already holds this finished run: evaluating it again (--overwrite retrains)")
    else:
        print(f"training {what} -> {out} ({'resuming' if args.resume else f'{cfg.epochs} epochs'}, Ctrl-C "
              "saves and stops)", flush=True)
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    skipped = result["skipped"]
    if skipped["train"] or skipped["valid"]:
        print(f"skipped {skipped['train']} training and {skipped['valid']} validation pairs longer than "
              f"{skipped['max_train_len']} tokens on a side (--max-train-len)")
    hist = result["history"]
    if hist:
        last = hist[-1]
        valid = f", valid loss {last['valid_loss']:.3f}" if "valid_loss" in last else ""
        print(f"epoch {last['epoch']} of {result['config'].epochs}: train loss {last['train_loss']:.3f}{valid}; "
              f"{result['train_seconds']:.0f} s of training in this session")
    if result["status"] == "interrupted":
        print(f"interrupted: checkpoint saved in {out}; continue with "
              f"`attnkit translate train --out {out} --resume`", file=sys.stderr)
        return 130
    if result["status"] == "time limit":
        done = len(hist)
        print(f"time limit reached ({cfg.max_minutes} min) with {done} of {result['config'].epochs} epochs complete: "
              f"checkpoint saved in {out}; `--resume` continues")
    model = result["model"]
    metrics, samples = evaluate(model, result["splits"]["test"], result["src_vocab"], result["tgt_vocab"],
                                beam=args.beam, length_penalty=args.length_penalty, max_len=result["config"].max_len)
    metrics["train_seconds_this_session"] = round(result["train_seconds"], 1)
    metrics["epochs"] = len(hist)
    pictures = write_report(out, model, metrics, samples, result["src_vocab"], result["tgt_vocab"])
    print("held-out results:")
    _print_metrics(metrics)
    print(f"metrics: {out / 'metrics.json'}   samples: {out / 'samples.txt'}")
    _print_pictures(out, pictures)
    return 0


@_guarded
def cmd_eval(args) -> int:
    from attnkit.tasks.translate.checkpoint import load_trained
    from attnkit.tasks.translate.data import load_pairs
    from attnkit.tasks.translate.evaluate import evaluate, write_report
    from attnkit.tasks.translate.train import TrainConfig, load_splits

    model, meta, src_vocab, tgt_vocab = load_trained(args.run)
    cfg = TrainConfig.from_dict(meta["train"])
    if not args.data and cfg.data != "embedded" and not Path(cfg.data).is_file():
        return _fail(f"{cfg.data}: the run's data file is not found (a relative path is relative to the "
                     "directory training ran in); run from there, or give the file with --data")
    pairs = load_pairs(args.data) if args.data else load_splits(cfg)["test"]
    metrics, samples = evaluate(model, pairs, src_vocab, tgt_vocab, beam=args.beam,
                                length_penalty=args.length_penalty, max_len=cfg.max_len)
    out = Path(args.out or args.run)
    pictures = write_report(out, model, metrics, samples, src_vocab, tgt_vocab)
    print(json.dumps(metrics))
    _print_pictures(out, pictures)
    return 0


@_guarded
def cmd_predict(args) -> int:
    from attnkit.tasks.translate.checkpoint import load_trained
    from attnkit.tasks.translate.data import text_lines
    from attnkit.tasks.translate.evaluate import translate_tokens
    from attnkit.tasks.translate.tokenize import detokenize_text, tokenize
    from attnkit.tasks.translate.train import TrainConfig

    model, meta, src_vocab, tgt_vocab = load_trained(args.run)
    if args.sentences:
        lines = [(f"sentence {i}", s) for i, s in enumerate(args.sentences, 1)]
    else:
        lines = [(f"<stdin>:{i}", s) for i, s in enumerate(text_lines(sys.stdin.read()), 1) if s.strip()]
    if not lines:
        return _fail("no sentence to translate: give sentences as arguments or one per line on stdin", 2)
    tokens = []
    for where, text in lines:
        toks = tokenize(text)
        if not toks:
            return _fail(f"{where}: the sentence is empty")
        unknown = src_vocab.unknown(toks)
        if unknown and not args.allow_unknown:
            words = ", ".join(repr(w) for w in unknown[:5])
            return _fail(f"{where}: unknown word(s) {words} (not in the source vocabulary of "
                         f"{Path(args.run) / 'checkpoint.json'}); rephrase, or pass --allow-unknown")
        tokens.append(toks)
    cfg = TrainConfig.from_dict(meta["train"])
    outputs = translate_tokens(model, tokens, src_vocab, tgt_vocab, beam=args.beam,
                               length_penalty=args.length_penalty, max_len=cfg.max_len)
    for hyp, _w, _labels in outputs:
        print(detokenize_text(hyp))
    if args.html is not None:
        from attnkit.tasks.translate.explorer import write_attention_html

        samples = [{"src": s, "hyp": h, "weights": w, "hyp_labels": labels}
                   for s, (h, w, labels) in zip(tokens, outputs, strict=True)]
        path = write_attention_html(args.html, model, samples, src_vocab, tgt_vocab,
                                    title=f"attnkit translate predict ({Path(args.run)})")
        print(f"attention explorer: {path}", file=sys.stderr)
    return 0
