"""``attnkit lm``: linear attention as an RNN, measured: per-token generation cost vs position.

Seed 000: self-attention over a growing prefix costs more with every token (a KV cache saves recomputing keys
but each new token still attends to all ``t`` of them), while linear attention ("Transformers are RNNs",
Katharopoulos et al. 2020) carries a fixed-size state, so every token costs the same. Two tiny character-level
models, identical but for the attention, are trained on counting text written offline with ``num2words``
(one number a line); then each generates ``--gen-len`` tokens one at a time and every step is timed
(the two models take turns token by token, so load from other processes falls on both alike).

Run directory (``--out``): ``metrics.json`` (losses, samples, per-position timings in bins) and
``cost_per_token.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from attnkit import _argtypes as A
from attnkit._io import save_figure_atomic, write_text_atomic


def register(subparsers) -> None:
    p = subparsers.add_parser("lm", help="linear attention as an RNN: per-token generation cost",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/lm", type=A.path, help="run directory (default: %(default)s)")
    p.add_argument("--numbers", type=A.positive_int, default=None,
                   help="count from 1 to N in words for the corpus (default 3000)")
    p.add_argument("--steps", type=A.positive_int, default=None, help="training steps per model (default 400)")
    p.add_argument("--context", type=A.positive_int, default=None, help="training window (characters), default 128")
    p.add_argument("--batch-size", type=A.positive_int, default=None, help="default 32")
    p.add_argument("--lr", type=A.positive_float, default=3e-3)
    p.add_argument("--embed-dim", type=A.positive_int, default=None, help="default 64")
    p.add_argument("--heads", type=A.positive_int, default=4, help="divides --embed-dim")
    p.add_argument("--layers", type=A.positive_int, default=None, help="default 2")
    p.add_argument("--gen-len", type=A.positive_int, default=None,
                   help="tokens generated (and timed) per model (default 16384)")
    p.add_argument("--bins", type=A.positive_int, default=None,
                   help="position bins for the timing table and plot (default 32)")
    p.add_argument("--seed", type=A.int_at_least(0, 2**31 - 1), default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for CI (seconds), for the options not given")
    p.set_defaults(func=run)


def counting_text(n: int) -> str:
    """``"one\\ntwo\\nthree\\n...<n in words>\\n"``: one number a line, written with num2words (English)."""
    from num2words import num2words

    if n < 1:
        raise ValueError(f"--numbers must be >= 1; got {n}")
    return "".join(num2words(i) + "\n" for i in range(1, n + 1))


def _write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def run(args: argparse.Namespace) -> int:
    from attnkit._progress import progress as tqdm
    from attnkit.tasks.lm_model import CharLM

    A.fill_defaults(args, dict(numbers=3000, steps=400, context=128, embed_dim=64, layers=2, gen_len=16384,
                               bins=32, batch_size=32),
                    dict(numbers=60, steps=3, context=32, embed_dim=16, layers=1, gen_len=64, bins=4, batch_size=8))
    if args.embed_dim % args.heads:
        return A.usage_error("lm", f"--heads ({args.heads}) must divide --embed-dim ({args.embed_dim})")
    if args.bins > args.gen_len:
        return A.usage_error("lm", f"--bins ({args.bins}) must be <= --gen-len ({args.gen_len})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = counting_text(args.numbers)
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    if len(val_data) <= args.context + 1:
        return A.usage_error("lm", f"--numbers {args.numbers} gives too little text for --context "
                                   f"{args.context} (the validation tenth has {len(val_data)} characters)")

    results, models = {}, {}
    for kind in ("linear", "softmax"):
        torch.manual_seed(args.seed)
        model = CharLM(len(vocab), embed_dim=args.embed_dim, num_heads=args.heads, num_layers=args.layers,
                       attention=kind)
        gen = torch.Generator().manual_seed(args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(args.steps, 1))
        bar = tqdm(range(args.steps), desc=f"train {kind}")
        for _ in bar:
            x, y = _batch(train_data, args.context, args.batch_size, gen)
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        val = validation_loss(model, val_data, args.context)
        prompt = "\n".join(text[split:].split("\n")[1:3]) + "\n"
        sample = "".join(vocab[i] for i in greedy(model, [stoi[c] for c in prompt], 60))
        results[kind] = {"val_loss_nats": val, "val_bits_per_char": val / math.log(2), "prompt": prompt,
                         "greedy_continuation": sample}
        models[kind] = model
    for kind, seconds in time_generation(models, args.gen_len).items():
        results[kind].update(_bin_timings(seconds, args.bins))

    metrics = {"task": "lm", "seed": args.seed, "quick": bool(args.quick),
               "corpus": f"num2words counting 1..{args.numbers}", "characters": len(text), "vocab": len(vocab),
               "config": {k: getattr(args, k) for k in ("steps", "context", "batch_size", "lr", "embed_dim",
                                                        "heads", "layers", "gen_len", "bins")},
               "threads": torch.get_num_threads(), "results": results}
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    _plot(results, out / "cost_per_token.png")
    print("| attention | val bits/char | ms/token first quarter | ms/token last quarter | last / first | "
          "slope ms per 1k positions |")
    print("|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['val_bits_per_char']:.3f} | {r['ms_first_quarter']:.3f} | {r['ms_last_quarter']:.3f} | "
              f"{r['last_over_first']:.2f} | {r['slope_ms_per_1000_positions']:.4f} |")
    for kind, r in results.items():
        print(f"{kind}: {r['prompt']!r} -> {r['greedy_continuation']!r}")
    return 0


def _batch(data: torch.Tensor, context: int, batch_size: int, gen: torch.Generator):
    starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s:s + context] for s in starts.tolist()])  # (B, L)
    y = torch.stack([data[s + 1:s + context + 1] for s in starts.tolist()])  # (B, L)
    return x, y


@torch.no_grad()
def validation_loss(model, data: torch.Tensor, context: int) -> float:
    """Mean next-character cross-entropy (nats) over consecutive windows of the validation text."""
    model.eval()
    n = (len(data) - 1) // context
    x = data[: n * context].view(n, context)  # (n, L)
    y = data[1: n * context + 1].view(n, context)  # (n, L)
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    model.train()
    return float(loss)


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of ``prompt`` by ``n`` tokens, token by token with the model's recurrent state."""
    model.eval()
    state = model.init_state(1, len(prompt) + n)
    out = []
    logits = None
    for pos, tok in enumerate(prompt):
        logits, state = model.step(torch.tensor([tok]), pos, state)
    for pos in range(len(prompt), len(prompt) + n):
        tok = int(logits.argmax(-1))
        out.append(tok)
        logits, state = model.step(torch.tensor([tok]), pos, state)
    model.train()
    return out


@torch.no_grad()
def time_generation(models: dict, length: int, *, desc: str = "generate") -> dict[str, list[float]]:
    """Seconds of each ``model.step`` while every model generates ``length`` tokens (greedy, batch 1).

    The models take turns token by token, so a burst of load from other processes hits all of them alike.
    """
    from attnkit._progress import progress as tqdm

    states = {k: m.eval().init_state(1, length) for k, m in models.items()}
    toks = {k: torch.zeros(1, dtype=torch.long) for k in models}
    seconds: dict[str, list[float]] = {k: [] for k in models}
    for pos in tqdm(range(length), desc=desc):
        for k, m in models.items():
            t0 = time.perf_counter()
            logits, states[k] = m.step(toks[k], pos, states[k])
            toks[k] = logits.argmax(-1)
            seconds[k].append(time.perf_counter() - t0)
    for m in models.values():
        m.train()
    return seconds


def _bin_timings(seconds: list[float], bins: int) -> dict:
    """Median milliseconds per token in ``bins`` consecutive position ranges (medians resist other load)."""
    size = max(len(seconds) // bins, 1)
    starts = list(range(0, len(seconds) - size + 1, size))[:bins]
    medians = [1e3 * statistics.median(seconds[s:s + size]) for s in starts]
    q = max(len(medians) // 4, 1)
    first, last = statistics.median(medians[:q]), statistics.median(medians[-q:])
    # least-squares slope of the bin medians against position, in ms per 1,000 positions
    xs = [s + size / 2 for s in starts]
    mx, my = statistics.fmean(xs), statistics.fmean(medians)
    var = sum((x - mx) ** 2 for x in xs)
    slope = 1e3 * sum((x - mx) * (y - my) for x, y in zip(xs, medians, strict=True)) / var if var else 0.0
    return {"bin_start_positions": starts, "bin_size": size, "ms_per_token_median": medians,
            "ms_first_quarter": first, "ms_last_quarter": last, "last_over_first": last / first,
            "slope_ms_per_1000_positions": slope}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"linear": "linear attention, recurrent step", "softmax": "softmax attention, KV cache"}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind, r in results.items():
        x = [s + r["bin_size"] / 2 for s in r["bin_start_positions"]]
        ax.plot(x, r["ms_per_token_median"], marker=".", label=labels[kind])
    ax.set(xlabel="position of the generated token", ylabel="ms per token (median per bin)",
           title="autoregressive generation cost per token", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
