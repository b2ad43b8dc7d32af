"""``attnkit speech``: spoken digits (FSDD) with truncated (windowed) self-attention vs full attention.

The same small Transformer encoder over log-mel frames is trained twice: every frame attending to every frame
(full), and every frame attending only to the frames within ``±window`` of it (truncated, seed 000). Both are
scored on the official test split (takes 0-4), then timed and their peak tensor memory measured per batch on
the test set's own recordings (batches of ``--batch-size`` in a seeded order, padded to the longest member),
at inference (forward) and in a training step (forward + backward).

Run directory (``--out``): ``metrics.json``, ``speech.png`` (accuracy per epoch, time and memory per batch),
``window_mask.png`` and the feature cache ``features-*.npz``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnkit import _argtypes as A
from attnkit._io import save_figure_atomic, write_json_atomic

log = logging.getLogger(__name__)
DEFAULT_DATA = "../shared/data/fsdd/recordings"


def register(subparsers) -> None:
    p = subparsers.add_parser("speech", help="spoken digits with truncated (windowed) self-attention",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, type=A.path,
                   help="FSDD recordings folder (default: %(default)s)")
    p.add_argument("--out", default="runs/speech", type=A.path, help="run directory (default: %(default)s)")
    p.add_argument("--window", type=A.nonnegative_int, default=16,
                   help="truncated attention: each frame sees ±WINDOW frames (5 ms each); 0 = full attention only")
    p.add_argument("--full", action="store_true", help="train only the full-attention model")
    p.add_argument("--epochs", type=A.positive_int, default=None, help="default 15 (--quick: 1)")
    p.add_argument("--batch-size", type=A.positive_int, default=32)
    p.add_argument("--lr", type=A.positive_float, default=2e-3)
    p.add_argument("--embed-dim", type=A.positive_int, default=None, help="default 64 (--quick: 32)")
    p.add_argument("--heads", type=A.positive_int, default=4, help="divides --embed-dim")
    p.add_argument("--layers", type=A.positive_int, default=None, help="default 2 (--quick: 1)")
    p.add_argument("--dropout", type=A.probability, default=0.1)
    p.add_argument("--seed", type=A.int_at_least(0, 2**31 - 1), default=0)
    p.add_argument("--limit", type=A.nonnegative_int, default=None,
                   help="use only the first N train and N test files (0 = all; --quick: 30)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for CI: 30 files, 1 epoch, small model (for the options not given)")
    p.add_argument("--measure-only", action="store_true",
                   help="skip training: load model-*.safetensors from --out, score and measure them")
    p.set_defaults(func=run)


def _write_json_atomic(path: Path, obj) -> None:
    write_json_atomic(path, obj)


def _take(items: list, n: int) -> list:
    """Every k-th item so that about ``n`` remain, all digits and speakers kept (``n <= 0``: all)."""
    if n <= 0 or n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def run(args: argparse.Namespace) -> int:
    from attnkit._progress import progress as tqdm
    from attnkit.tasks import speech_data as sd
    from attnkit.tasks.datasets import fsdd
    from attnkit.tasks.speech_model import SpeechTransformer

    A.fill_defaults(args, dict(epochs=15, limit=0, embed_dim=64, layers=2),
                    dict(epochs=1, limit=30, embed_dim=32, layers=1))
    if args.embed_dim % args.heads:
        return A.usage_error("speech", f"--heads ({args.heads}) must divide --embed-dim ({args.embed_dim})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    config = sd.FeatureConfig()
    bar = lambda items: tqdm(items, desc="log-mel", leave=False)  # noqa: E731
    try:
        train_recs, test_recs = fsdd.split(fsdd.list_recordings(args.data))
        if not train_recs or not test_recs:
            raise ValueError(f"data {args.data!r} must hold both training takes (index 5-49) and test takes "
                             "(index 0-4) of the FSDD recordings")
        train_recs, test_recs = _take(train_recs, args.limit), _take(test_recs, args.limit)
        train = sd.load_features(train_recs, config, out, progress=bar)
        test = sd.load_features(test_recs, config, out, progress=bar)
    except ValueError as exc:
        print(f"attnkit speech: error: {exc}", file=sys.stderr)
        return 2
    mean, std = sd.normalizer(train)

    variants = [("full", 0)] if (args.full or args.window == 0) else [("truncated", args.window), ("full", 0)]
    results: dict[str, dict] = {}
    models = {}
    for name, window in variants:
        torch.manual_seed(args.seed)  # same initial weights and batch order for both variants
        model = SpeechTransformer(config.n_mels, embed_dim=args.embed_dim, num_heads=args.heads,
                                  num_layers=args.layers, ff_dim=2 * args.embed_dim, dropout=args.dropout,
                                  window=window)
        weights = out / f"model-{name}.safetensors"
        if args.measure_only:
            _load_weights(model, weights)
            results[name] = {"test_accuracy": evaluate(model, test, mean, std, args.batch_size),
                             "parameters": sum(p.numel() for p in model.parameters()), "trained_in_this_run": False}
        else:
            results[name] = _train(model, train, test, mean, std, args, label=name)
            _save_weights(model, weights)
        results[name]["window"] = window
        models[name] = model
        log.info("%s: test accuracy %.4f", name, results[name]["test_accuracy"])
    for name, cost in measure(models, test, mean, std, args).items():
        results[name].update(cost)

    lengths = [f.shape[0] for f in test.feats]
    metrics = {
        "task": "speech", "data": str(args.data), "seed": args.seed, "quick": bool(args.quick),
        "features": vars(config) if hasattr(config, "__dict__") else {},
        "model": {"embed_dim": args.embed_dim, "heads": args.heads, "layers": args.layers},
        "train_files": len(train), "test_files": len(test), "epochs": args.epochs, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "test_frames": {"min": min(lengths), "median": sorted(lengths)[len(lengths) // 2], "max": max(lengths)},
        "results": results,
    }
    _write_json_atomic(out / "metrics.json", metrics)
    _plot(results, out, args.window if args.window > 0 else 8)
    _print_table(results)
    return 0


def _train(model, train, test, mean, std, args, *, label: str) -> dict:
    from attnkit._progress import progress as tqdm
    from attnkit.tasks import speech_data as sd

    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(steps, 1), pct_start=0.1)
    train_lengths = [f.shape[0] for f in train.feats]
    curve, t0 = [], time.perf_counter()
    bar = tqdm(range(args.epochs), desc=f"train {label}")
    for _ in bar:
        model.train()
        total = 0.0
        for idx in sd.bucket_batches(train_lengths, args.batch_size, gen):
            x, lengths = sd.collate([train.feats[i] for i in idx], mean, std)  # (B, L, M), (B,)
            x = sd.spec_augment(x, lengths, gen)
            loss = torch.nn.functional.cross_entropy(model(x, lengths), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc = evaluate(model, test, mean, std, args.batch_size)
        curve.append(acc)
        bar.set_postfix(loss=f"{total / len(train):.3f}", test_acc=f"{acc:.3f}")
    return {"test_accuracy": curve[-1] if curve else float("nan"), "accuracy_per_epoch": curve,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": time.perf_counter() - t0, "trained_in_this_run": True}


def measure(models: dict, test, mean, std, args) -> dict[str, dict]:
    """Time and peak tensor memory per batch of every model on the test recordings.

    Batches: the test set in a seeded random order (not length-sorted), each padded to its longest recording.
    Timing takes turns model by model on every batch, repeated, median per batch, so a burst of load from
    other processes falls on all models alike; the figure is the mean over batches of those medians.
    """
    import statistics

    from attnkit.tasks import speech_data as sd
    from attnkit.tasks.speech_measure import peak_memory

    order = sd.batches(len(test), args.batch_size, torch.Generator().manual_seed(1234))
    batches = [sd.collate([test.feats[i] for i in idx], mean, std) for idx in order]
    batches = batches[:2] if args.quick else batches
    repeats = 1 if args.quick else 5

    def forward(model, x, n):
        model.eval()
        with torch.no_grad():
            return model(x, n)

    def train_step(model, x, n):
        model.train()
        model.zero_grad(set_to_none=True)
        model(x, n).sum().backward()

    out = {}
    for kind, fn in (("forward", forward), ("train_step", train_step)):
        for model in models.values():  # warm-up
            fn(model, *batches[0])
        times = {name: [[] for _ in batches] for name in models}
        for _ in range(repeats):
            for b, (x, n) in enumerate(batches):
                for name, model in models.items():
                    t0 = time.perf_counter()
                    fn(model, x, n)
                    times[name][b].append(time.perf_counter() - t0)
        for name, model in models.items():
            mem = [peak_memory(lambda m=model, x=x, n=n, f=fn: f(m, x, n)) for x, n in batches]
            res = out.setdefault(name, {})
            res[f"{kind}_ms_per_batch"] = 1e3 * statistics.fmean(statistics.median(t) for t in times[name])
            res[f"{kind}_peak_mib_per_batch_mean"] = _mib(statistics.fmean(mem))
            res[f"{kind}_peak_mib_per_batch_max"] = _mib(max(mem))
    for model in models.values():
        model.zero_grad(set_to_none=True)
        model.eval()
    frames = [int(x.shape[1]) for x, _ in batches]
    for res in out.values():
        res.update(measured_batches=len(batches), batch_frames_mean=statistics.fmean(frames),
                   batch_frames_max=max(frames), timing_repeats=repeats)
    return out


def _save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def _load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"--measure-only needs the weights {str(path)!r} from an earlier run with the same --out")
    model.load_state_dict(load_file(str(path)))


def _mib(nbytes: float) -> float:
    return round(nbytes / 2**20, 3)


@torch.no_grad()
def evaluate(model, data, mean, std, batch_size: int) -> float:
    """Accuracy of ``model`` on ``data``."""
    from attnkit.tasks import speech_data as sd

    model.eval()
    correct = 0
    for idx in sd.batches(len(data), batch_size, None):
        x, lengths = sd.collate([data.feats[i] for i in idx], mean, std)
        correct += int((model(x, lengths).argmax(-1) == data.labels[idx]).sum())
    model.train()
    return correct / len(data)


def _print_table(results: dict) -> None:
    cols = ["test_accuracy", "forward_ms_per_batch", "forward_peak_mib_per_batch_mean", "train_step_ms_per_batch",
            "train_step_peak_mib_per_batch_mean"]
    print("| model | window | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for name, r in results.items():
        print(f"| {name} | {r['window']} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")


def _plot(results: dict, out: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnkit import masks

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, r in results.items():
        curve = r.get("accuracy_per_epoch", [])
        axes[0].plot(range(1, len(curve) + 1), curve, marker=".", label=name)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title="FSDD official test split")
    axes[0].legend()
    names = list(results)
    for ax, unit, title in ((axes[1], "ms_per_batch", "time per batch (ms)"),
                            (axes[2], "peak_mib_per_batch_mean", "peak tensor memory per batch (MiB)")):
        for i, kind in enumerate(("forward", "train_step")):
            xs = [j + 0.4 * i for j in range(len(names))]
            ax.bar(xs, [results[n][f"{kind}_{unit}"] for n in names], width=0.4, label=kind.replace("_", " "))
        ax.set_xticks([j + 0.2 for j in range(len(names))], names)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    _save(fig, out / "speech.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    L = 4 * window + 8
    ax.imshow(masks.window(window, window).materialize(L, L).numpy(), cmap="Greys")
    ax.set(title=f"truncated attention: window ±{window}", xlabel="key frame", ylabel="query frame")
    _save(fig, out / "window_mask.png")
    plt.close(fig)


def _save(fig, path: Path) -> None:
    save_figure_atomic(fig, path)
