"""Atomic file writes: write a temporary file in the same folder, flush it to disk, then ``os.replace`` it.

A run interrupted mid-write leaves the previous file intact (or none), never a truncated one, and the temporary
file is removed on failure. After the rename the folder itself is fsync'ed, so the new name survives a power
cut too. New files get the mode ``open()`` would give them (0666 minus the umask), not ``mkstemp``'s 0600.
Every writer in attnkit (checkpoints, metrics, figures, benchmark results) goes through :func:`atomic_path`.
The module sits below every layer, so tasks, bench and viz may all use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def default_mode(base: int = 0o666) -> int:
    """``base`` minus the process umask: the mode a plain ``open(path, "w")`` (or ``mkdir``) would give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename, a new or deleted file) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (not atomic by itself; see :func:`write_bytes_atomic`).

    Uses ``os.write``/``os.fsync`` directly, so a test can inject a full disk (``OSError(ENOSPC)``) at any call.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, default_mode())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 24]):]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder is created); on success it replaces ``path``,
    on failure it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, default_mode())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never half of it (fsync'ed)."""
    with atomic_path(path) as tmp:
        write_file(tmp, data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj, *, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def save_figure_atomic(fig, path: str | Path, dpi: int = 110, **savefig_kwargs) -> None:
    """``fig.savefig`` through a temporary file (the suffix keeps the format matplotlib infers)."""
    with atomic_path(path, suffix=Path(path).suffix or ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
