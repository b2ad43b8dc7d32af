"""One trainer per run directory: an exclusive ``flock`` on ``<run>/run.lock``.

The kernel releases the lock when its holder ends, however it ends (exit, Ctrl-C, ``kill -9``), so a stale lock
never needs cleaning up. The file holds the holder's pid, for the message a second trainer gets. The lock is
re-entrant within one process (the CLI takes it before it looks at the directory, ``train`` takes it again).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attnkit.tasks.translate.errors import TranslateError

LOCK = "run.lock"
_held: dict[str, list[int]] = {}  # real path of the lock file -> [fd, depth]


class RunLocked(TranslateError):
    """Another process trains in this run directory."""


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block; raise :class:`RunLocked` if another process has it."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir / LOCK)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"{run_dir}: another trainer (pid {holder}) is using this run directory; wait for it "
                        "to finish (or stop it), or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # closing the descriptor releases the lock; the file stays (removing it would race)
