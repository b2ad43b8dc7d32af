"""``attnkit vision``: ViT vs CNN vs local-attention ViT on scikit-learn's 8x8 digits, accuracy vs data size.

Seed 000: a CNN is self-attention restricted to a receptive field, so it has a stronger prior and needs less
data; a ViT can learn more freely and catches up as data grows. Three models of similar size are trained on
growing subsets of the same training split (``--sizes``, several ``--seeds``) and scored on one fixed test
split: ``vit`` (full attention over patches), ``local`` (the same ViT with attention restricted to a
``k x k`` neighbourhood of patches, :func:`attnkit.nn.vit.neighbourhood_mask`) and ``cnn``.

Run directory (``--out``): ``metrics.json`` (every run and the mean/std table), ``accuracy_vs_data.png``,
``local_mask.png`` and ``attention.html``: the attention explorer of the ViT trained on the most data (first
seed) on a few test digits, every layer and head, patch attention drawn over the 8x8 image.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from attnkit import _argtypes as A
from attnkit._io import save_figure_atomic, write_text_atomic
from attnkit.tasks.vision_models import MODELS

DEFAULTS = dict(sizes=[100, 200, 400, 800, "all"], seeds=3, embed_dim=48, depth=3, cnn_width=32, epochs=120.0,
                min_steps=100)
QUICK = dict(sizes=[40, "all"], seeds=1, embed_dim=16, depth=1, cnn_width=8, epochs=0.0, min_steps=3)


def register(subparsers) -> None:
    p = subparsers.add_parser("vision", help="ViT vs CNN vs local attention on 8x8 digits",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/vision", type=A.path, help="run directory (default: %(default)s)")
    p.add_argument("--sizes", default=None, type=A.sizes_list(minimum=10),
                   help="training-set sizes (>= 10), comma separated, 'all' (default 100,200,400,800,all)")
    p.add_argument("--seeds", type=A.positive_int, default=None, help="seeds per size and model (default 3)")
    p.add_argument("--seed", type=A.int_at_least(0, 2**31 - 1), default=0, help="first seed")
    p.add_argument("--models", default=list(MODELS), type=A.comma_list(MODELS),
                   help="comma separated subset of vit,local,cnn")
    p.add_argument("--patch-size", type=int, default=2, choices=(1, 2, 4, 8), help="pixels; divides 8")
    p.add_argument("--k", type=A.odd_positive_int(), default=3,
                   help="local attention neighbourhood side (odd), in patches")
    p.add_argument("--embed-dim", type=A.positive_int, default=None, help="default 48")
    p.add_argument("--depth", type=A.positive_int, default=None, help="default 3")
    p.add_argument("--heads", type=A.positive_int, default=4, help="divides --embed-dim")
    p.add_argument("--cnn-width", type=A.positive_int, default=None, help="CNN channels (first layer; then 2x), "
                                                                          "default 32")
    p.add_argument("--dropout", type=A.probability, default=0.1, help="ViT dropout (the CNN has none)")
    p.add_argument("--pos", choices=("learned", "sinusoidal"), default="learned", help="ViT positions")
    p.add_argument("--epochs", type=A.nonnegative_float, default=None,
                   help="passes over the subset (at least --min-steps), default 120")
    p.add_argument("--min-steps", type=A.positive_int, default=None, help="default 100")
    p.add_argument("--batch-size", type=A.positive_int, default=64)
    p.add_argument("--lr", type=A.positive_float, default=1e-3)
    p.add_argument("--shift", type=A.int_at_least(0, 4), default=0,
                   help="augment with random shifts of up to SHIFT pixels (0 = none; 1 costs the ViT ~3 points)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for CI (seconds): sizes 40,all, 1 seed, small models, 3 steps, for every one of "
                        "these options not given")
    p.set_defaults(func=run)


def _write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _parse_sizes(sizes: list, n_train: int) -> list[int]:
    """``--sizes`` (ints and 'all', parsed) as numbers of training images, capped at ``n_train``."""
    return [n_train if s == "all" else min(int(s), n_train) for s in sizes]


def run(args: argparse.Namespace) -> int:
    from attnkit._progress import progress as tqdm
    from attnkit.tasks import vision_models as vm

    A.fill_defaults(args, DEFAULTS, QUICK)
    models = list(args.models)
    if "vit" in models or "local" in models:
        if args.embed_dim % args.heads:
            return A.usage_error("vision", f"--heads ({args.heads}) must divide --embed-dim ({args.embed_dim})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = vm.load_digits_split()
    sizes = _parse_sizes(args.sizes, len(y_train))
    seeds = list(range(args.seed, args.seed + args.seeds))
    jobs = [(n, s, m) for n in sizes for s in seeds for m in models]
    runs, params, shown = [], {}, None  # shown: the ViT the explorer draws (most data, first seed)
    bar = tqdm(jobs, desc="vision")
    for n, seed, name in bar:
        torch.manual_seed(seed)
        model = vm.build(name, embed_dim=args.embed_dim, depth=args.depth, heads=args.heads,
                         patch_size=args.patch_size, k=args.k, cnn_width=args.cnn_width, pos_embedding=args.pos,
                         dropout=args.dropout)
        params[name] = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(seed)
        idx = vm.stratified_subset(y_train, n, gen)
        steps = max(args.min_steps, math.ceil(args.epochs * n / args.batch_size))
        train(model, x_train[idx], y_train[idx], steps=steps, lr=args.lr, batch_size=args.batch_size, gen=gen,
              shift=args.shift)
        acc = evaluate(model, x_test, y_test)
        runs.append({"model": name, "train_size": n, "seed": seed, "steps": steps, "test_accuracy": acc})
        if name != "cnn" and seed == seeds[0] and (shown is None or n > shown[0]):
            shown = (n, name, model)
        bar.set_postfix(model=name, n=n, acc=f"{acc:.3f}")

    sizes = sorted(set(sizes))
    table = summarize(runs, models, sizes)
    metrics = {
        "task": "vision", "data": "sklearn.datasets.load_digits (8x8), stratified 70/30 split, random_state=0",
        "train_images": len(y_train), "test_images": len(y_test), "sizes": sizes, "seeds": seeds,
        "parameters": params, "quick": bool(args.quick),
        "config": {k: getattr(args, k) for k in ("patch_size", "k", "embed_dim", "depth", "heads", "cnn_width",
                                                 "dropout", "pos", "epochs", "min_steps", "batch_size", "lr",
                                                 "shift")},
        "table": table, "runs": runs,
    }
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    _print_table(table, models, sizes, params)
    _plot(table, models, sizes, out, grid=8 // args.patch_size, k=args.k, patch_size=args.patch_size)
    if shown is not None:
        n, name, model = shown
        path = write_attention_html(out / "attention.html", model, x_test[:4], y_test[:4], args.patch_size,
                                    title=f"attnkit vision: {name} trained on {n} digits")
        print(f"attention explorer (open in a browser): {path}")
    return 0


@torch.no_grad()
def write_attention_html(path: Path, model, images, labels, patch_size: int, *, title: str) -> Path:
    """The explorer of ``model`` (a ViT) on ``images (B, 1, 8, 8)``: every layer and head of its patch attention,
    the class token first, one example per image."""
    from attnkit.viz.explorer import Explorer

    model.eval()
    logits, weights = model(images, need_weights=True)  # (B, 10), per layer (B, H, 1 + P, 1 + P)
    grid = images.shape[-1] // patch_size
    tokens = ["[class]"] + [f"patch r{r}c{c}" for r in range(grid) for c in range(grid)]
    page = Explorer(title=title)
    for b in range(images.shape[0]):
        page.add(tokens, [w[b] for w in weights], image=images[b, 0], patch_grid=(grid, grid), patch_offset=1,
                 name=f"test digit {b}: label {int(labels[b])}, predicted {int(logits[b].argmax())}")
    return page.write(path)


def train(model, x, y, *, steps: int, lr: float, batch_size: int, gen: torch.Generator, shift: int = 0) -> None:
    """AdamW with a one-cycle schedule, random batches, optionally shifted by up to ``shift`` pixels."""
    from attnkit.tasks.vision_models import random_shift

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=gen)
        images = random_shift(x[idx], gen, shift) if shift > 0 else x[idx]
        loss = torch.nn.functional.cross_entropy(model(images), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 512) -> float:
    """Test accuracy."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def summarize(runs: list[dict], models: list[str], sizes: list[int]) -> dict:
    """``table[model][size] = {"mean", "std", "n"}`` over seeds."""
    table: dict = {}
    for m in models:
        table[m] = {}
        for n in sizes:
            accs = [r["test_accuracy"] for r in runs if r["model"] == m and r["train_size"] == n]
            table[m][str(n)] = {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs), "n": len(accs)}
    return table


def _print_table(table: dict, models: list[str], sizes: list[int], params: dict) -> None:
    print("| model (params) | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for m in models:
        cells = [f"{100 * table[m][str(n)]['mean']:.1f} ± {100 * table[m][str(n)]['std']:.1f}" for n in sizes]
        print(f"| {m} ({params[m]:,}) | " + " | ".join(cells) + " |")


def _plot(table: dict, models: list[str], sizes: list[int], out: Path, *, grid: int, k: int,
          patch_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnkit.nn.vit import neighbourhood_mask

    labels = {"vit": "ViT (full attention)", "local": f"ViT, {k}x{k} local attention", "cnn": "CNN"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        mean = [100 * table[m][str(n)]["mean"] for n in sizes]
        std = [100 * table[m][str(n)]["std"] for n in sizes]
        ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=labels[m])
    ax.set_xscale("log")
    ax.set(xlabel="training images", ylabel="test accuracy (%)", title="8x8 digits: accuracy vs data (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, out / "accuracy_vs_data.png")
    plt.close(fig)

    mask = neighbourhood_mask(grid, grid, k)  # (1 + P, 1 + P)
    centre = (grid // 2) * grid + grid // 2  # a patch near the middle
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    axes[0].imshow(mask.numpy(), cmap="Greys", interpolation="nearest")
    axes[0].set(title=f"local attention mask ({k}x{k} patches, token 0 = class)", xlabel="key token",
                ylabel="query token")
    axes[1].imshow(mask[1 + centre, 1:].reshape(grid, grid).numpy(), cmap="Blues", interpolation="nearest",
                   vmin=0, vmax=1.5)
    axes[1].plot(centre % grid, centre // grid, "r*", markersize=14)
    axes[1].set_xticks(range(grid))
    axes[1].set_yticks(range(grid))
    axes[1].set_xticks([i - 0.5 for i in range(grid + 1)], minor=True)
    axes[1].set_yticks([i - 0.5 for i in range(grid + 1)], minor=True)
    axes[1].grid(which="minor", color="grey", linewidth=0.5)
    axes[1].tick_params(which="minor", length=0)
    axes[1].set(title=f"what patch {centre} (*) may attend to\n= a {k}x{k} conv's receptive field "
                      f"({patch_size}x{patch_size}-pixel patches)")
    fig.tight_layout()
    _save(fig, out / "local_mask.png")
    plt.close(fig)


def _save(fig, path: Path) -> None:
    save_figure_atomic(fig, path)
