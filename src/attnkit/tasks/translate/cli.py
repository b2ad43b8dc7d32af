"""``attnkit translate train|eval|predict``: the command line of the translation job.

User mistakes (a bad data file, a corrupt or mismatched checkpoint, unknown words) print one line on stderr
naming the file/line and what was wrong, and return a non-zero exit code; no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

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
                          lr=5e-3, min_freq=2),
    # sized to finish 9 epochs of the 65k Tatoeba training pairs in under 30 minutes on 2 cores; batches of 64
    # (more updates in the budget), warm-up, then linear decay to 0 at the last step
    ("file", "transformer"): dict(hidden=128, num_heads=4, ff_dim=512, num_layers=2, dropout=0.1, epochs=9,
                                  batch_size=64, lr=1.5e-3, warmup_steps=1000, schedule="linear", min_freq=2,
                                  label_smoothing=0.1),
}
# command-line flag -> TrainConfig field
OPTIONS = {
    "lang": str, "max_pairs": int, "score": str, "embed_dim": int, "hidden": int, "num_layers": int,
    "dropout": float, "num_heads": int, "ff_dim": int, "epochs": int, "batch_size": int, "lr": float,
    "warmup_steps": int, "schedule": str,
    "clip": float, "label_smoothing": float, "seed": int, "split_seed": int, "valid_frac": float,
    "test_frac": float, "min_freq": int, "max_len": int, "max_minutes": float,
}
FLAGS = ("bidirectional",)  # store_true options that map to TrainConfig fields


def register(subparsers) -> None:
    """Add ``translate`` with its ``train``, ``eval`` and ``predict`` sub-commands."""
    p = subparsers.add_parser("translate", help="train / evaluate / use an attention translator",
                              description="Train an encoder-decoder translator with attention, evaluate it "
                                          "(BLEU, exact match, alignment) and draw where it looks.")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="translate_command", metavar="{train,eval,predict}")

    t = sub.add_parser("train", help="train a model (default: additive attention on the embedded date task)")
    t.add_argument("--data", default="embedded",
                   help="'embedded' (English dates -> French/German, no download) or a source<TAB>target file")
    t.add_argument("--model", default="bahdanau", choices=("bahdanau", "luong", "transformer"))
    t.add_argument("--out", default=DEFAULT_RUN, help=f"run directory (default {DEFAULT_RUN})")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    t.add_argument("--beam", type=int, default=1, help="beam size for the final evaluation (1 = greedy)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--bidirectional", action="store_true", default=None,
                   help="GRU models: read the source in both directions (Bahdanau et al.)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 for the embedded task, whose small matrices run faster on "
                        "one thread; torch's default otherwise)")
    for name, typ in OPTIONS.items():
        choices = ("constant", "linear") if name == "schedule" else None
        t.add_argument("--" + name.replace("_", "-"), type=typ, default=None, dest=name, choices=choices)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained model on its held-out split (or on --data)")
    e.add_argument("--run", default=DEFAULT_RUN, help="run directory with checkpoint.json")
    e.add_argument("--data", default=None, help="evaluate on every pair of this file instead")
    e.add_argument("--beam", type=int, default=1)
    e.add_argument("--out", default=None, help="where to write metrics/samples/heatmaps (default: --run)")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("predict", help="translate sentences given as arguments or one per line on stdin")
    r.add_argument("sentences", nargs="*", help="sentences to translate (default: read stdin)")
    r.add_argument("--run", default=DEFAULT_RUN)
    r.add_argument("--beam", type=int, default=1)
    r.add_argument("--allow-unknown", action="store_true", help="translate unknown words as <unk>")
    r.add_argument("--html", default=None, metavar="FILE",
                   help="also write an attention explorer of these sentences to FILE (.html)")
    r.set_defaults(func=cmd_predict)


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


def build_config(args):
    """The TrainConfig of ``args``: the preset for (data, model), then every option given explicitly."""
    from attnkit.tasks.translate.train import EMBEDDED, TrainConfig

    kind = "embedded" if args.data == EMBEDDED else "file"
    preset = PRESETS[(kind, "transformer" if args.model == "transformer" else "rnn")]
    values = {"data": args.data, "model": args.model, **preset}
    values.update({k: getattr(args, k) for k in (*OPTIONS, *FLAGS) if getattr(args, k, None) is not None})
    return TrainConfig.from_dict(values)


def _print_metrics(result: dict) -> None:
    keys = [("bleu", "BLEU", "{:.1f}"), ("exact_match", "exact match", "{:.1%}"),
            ("alignment_accuracy", "alignment accuracy", "{:.1%}")]
    for key, label, fmt in keys:
        if key in result:
            print(f"  {label:>19}: {fmt.format(result[key])}")
    print(f"  {'held-out sentences':>19}: {result['sentences']} ({result['pairs']} pairs, {result['decoding']})")


def _check_args(args) -> int | None:
    if getattr(args, "beam", 1) < 1:
        return _fail(f"--beam must be >= 1, got {args.beam}", 2)
    if (getattr(args, "warmup_steps", None) or 0) < 0:
        return _fail(f"--warmup-steps must be >= 0, got {args.warmup_steps}", 2)
    for name in ("epochs", "batch_size", "hidden", "num_layers", "num_heads", "max_len"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}", 2)
    return None


@_guarded
def cmd_train(args) -> int:
    import torch

    from attnkit.tasks.translate.evaluate import evaluate, write_report
    from attnkit.tasks.translate.train import train

    bad = _check_args(args)
    if bad is not None:
        return bad
    if args.data != "embedded" and not Path(args.data).is_file():
        return _fail(f"{args.data}: data file not found (use --data embedded for the built-in task)")
    try:
        cfg = build_config(args)
    except (ValueError, TypeError) as exc:
        return _fail(str(exc), 2)
    threads = args.threads if args.threads is not None else (1 if args.data == "embedded" else None)
    if threads is not None:
        if threads < 1:
            return _fail(f"--threads must be >= 1, got {threads}", 2)
        torch.set_num_threads(threads)
    out = Path(args.out)
    if args.resume and args.overwrite:
        return _fail("--resume and --overwrite exclude each other", 2)
    from attnkit.tasks.translate.checkpoint import load_checkpoint

    again = False  # a finished run with this very config: evaluate it again instead of refusing
    if args.resume and args.epochs is None:
        meta, _ = load_checkpoint(out)
        cfg = dataclasses.replace(cfg, epochs=meta["train"]["epochs"])
    elif not args.resume and (out / "checkpoint.json").exists() and not args.overwrite:
        meta, _ = load_checkpoint(out)
        if meta.get("status") != "done" or meta.get("train") != dataclasses.asdict(cfg):
            return _fail(f"{out}: already holds another or an unfinished run; continue it with --resume, "
                         "start over with --overwrite, or choose another --out")
        again = args.resume = True
    elif args.overwrite:
        for name in ("checkpoint.json", "weights.safetensors"):
            (out / name).unlink(missing_ok=True)
    what = f"{cfg.model} on {'the embedded date task' if cfg.data == 'embedded' else cfg.data}"
    if again:
        print(f"{out} already holds this finished run: evaluating it again (--overwrite retrains)")
    else:
        print(f"training {what} -> {out} ({'resuming' if args.resume else f'{cfg.epochs} epochs'}, Ctrl-C "
              "saves and stops)", flush=True)
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    hist = result["history"]
    if hist:
        last = hist[-1]
        valid = f", valid loss {last['valid_loss']:.3f}" if "valid_loss" in last else ""
        print(f"epoch {last['epoch']}: train loss {last['train_loss']:.3f}{valid}; "
              f"{result['train_seconds']:.0f} s of training in this session")
    if result["status"] == "interrupted":
        print(f"interrupted: checkpoint saved in {out}; continue with "
              f"`attnkit translate train --out {out} --resume`", file=sys.stderr)
        return 130
    if result["status"] == "time limit":
        print(f"time limit reached ({cfg.max_minutes} min): checkpoint saved in {out}")
    model = result["model"]
    metrics, samples = evaluate(model, result["splits"]["test"], result["src_vocab"], result["tgt_vocab"],
                                beam=args.beam, max_len=result["config"].max_len)
    metrics["train_seconds_this_session"] = round(result["train_seconds"], 1)
    metrics["epochs"] = len(hist)
    pictures = write_report(out, model, metrics, samples, result["src_vocab"], result["tgt_vocab"])
    print("held-out results:")
    _print_metrics(metrics)
    print(f"metrics: {out / 'metrics.json'}   samples: {out / 'samples.txt'}")
    print(f"pictures ({len(pictures)} attention heatmaps): {out / 'heatmaps'}/")
    print(f"attention explorer (open in a browser): {out / 'attention.html'}")
    return 0


@_guarded
def cmd_eval(args) -> int:
    from attnkit.tasks.translate.checkpoint import load_trained
    from attnkit.tasks.translate.data import load_pairs
    from attnkit.tasks.translate.evaluate import evaluate, write_report
    from attnkit.tasks.translate.train import TrainConfig, load_splits

    bad = _check_args(args)
    if bad is not None:
        return bad
    model, meta, src_vocab, tgt_vocab = load_trained(args.run)
    cfg = TrainConfig.from_dict(meta["train"])
    pairs = load_pairs(args.data) if args.data else load_splits(cfg)["test"]
    metrics, samples = evaluate(model, pairs, src_vocab, tgt_vocab, beam=args.beam, max_len=cfg.max_len)
    out = Path(args.out or args.run)
    pictures = write_report(out, model, metrics, samples, src_vocab, tgt_vocab)
    print(json.dumps(metrics))
    print(f"pictures ({len(pictures)} attention heatmaps): {out / 'heatmaps'}/")
    print(f"attention explorer (open in a browser): {out / 'attention.html'}")
    return 0


@_guarded
def cmd_predict(args) -> int:
    from attnkit.tasks.translate.checkpoint import load_trained
    from attnkit.tasks.translate.evaluate import translate_tokens
    from attnkit.tasks.translate.tokenize import detokenize, tokenize
    from attnkit.tasks.translate.train import TrainConfig

    if args.beam < 1:
        return _fail(f"--beam must be >= 1, got {args.beam}", 2)
    if args.html is not None and (Path(args.html).suffix.lower() not in (".html", ".htm") or Path(args.html).is_dir()):
        return _fail(f"--html must name an .html file to write, got {args.html!r}", 2)
    model, meta, src_vocab, tgt_vocab = load_trained(args.run)
    if args.sentences:
        lines = [(f"sentence {i}", s) for i, s in enumerate(args.sentences, 1)]
    else:
        lines = [(f"<stdin>:{i}", s) for i, s in enumerate(sys.stdin.read().splitlines(), 1) if s.strip()]
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
    outputs = translate_tokens(model, tokens, src_vocab, tgt_vocab, beam=args.beam, max_len=cfg.max_len)
    for hyp, _w in outputs:
        print(detokenize(hyp))
    if args.html is not None:
        from attnkit.tasks.translate.explorer import write_attention_html

        samples = [{"src": s, "hyp": h, "weights": w} for s, (h, w) in zip(tokens, outputs, strict=True)]
        path = write_attention_html(args.html, model, samples, src_vocab, tgt_vocab,
                                    title=f"attnkit translate predict ({Path(args.run)})")
        print(f"attention explorer: {path}", file=sys.stderr)
    return 0
