"""Atomic file writes: write a temporary file in the same folder, flush it to disk, then ``os.replace`` it.

A run interrupted mid-write leaves the previous file intact (or none), never a truncated one, and the temporary
file is removed on failure. Every writer in attnkit (checkpoints, metrics, figures, benchmark results) goes
through :func:`atomic_path`. The module sits below every layer, so tasks, bench and viz may all use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder is created); on success it replaces ``path``,
    on failure it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never half of it (fsync'ed)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj, *, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def save_figure_atomic(fig, path: str | Path, dpi: int = 110, **savefig_kwargs) -> None:
    """``fig.savefig`` through a temporary file (the suffix keeps the format matplotlib infers)."""
    with atomic_path(path, suffix=Path(path).suffix or ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
