"""Command line: ``attnkit <command> ...``.

Each command lives in its own module and is imported only when used, so ``attnkit --help`` stays fast and
the core library never imports the recipes' heavy dependencies. A command module defines
``register(subparsers)``: it adds its sub-parser and sets ``func`` (called with the parsed namespace, returns
an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "tour": ("attnkit.tasks.tour", "print one small worked example of every mechanism"),
    "translate": ("attnkit.tasks.translate.cli", "train / evaluate / use an attention translator"),
    "speech": ("attnkit.tasks.speech", "spoken digits with truncated (windowed) self-attention"),
    "vision": ("attnkit.tasks.vision", "ViT vs CNN vs local attention on 8x8 digits"),
    "graph": ("attnkit.tasks.graph", "graph attention (GAT) on Cora or the karate club"),
    "lm": ("attnkit.tasks.lm", "linear attention as an RNN: per-token generation cost"),
    "bench": ("attnkit.bench.cli", "time attnkit's kernels against SDPA and other anchors"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="attnkit: attention mechanisms for PyTorch, with recipes you can run.",
        epilog="environment: ATTNKIT_NATIVE=0 keeps the pure-PyTorch kernels (no compiled CPU kernel); "
               "ATTNKIT_CACHE moves its build cache (default ~/.cache/attnkit); ATTNKIT_NATIVE_POOL_MB caps the "
               "freed output buffers it keeps for reuse (default 256, 0 = none). README: 'Compiled CPU tile "
               "kernel'.",
    )
    from attnkit import __version__

    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if wanted == name:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:  # an optional extra is missing
                parser.error(
                    f"command {name!r} needs an optional package that is not installed ({exc.name}); "
                    "install the extras with: pip install 'attnkit[tasks]'"
                )
            mod.register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
