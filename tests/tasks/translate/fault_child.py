"""A trainer that hurts itself in the middle of a checkpoint save (run by test_translate_faults.py).

    python fault_child.py OUT MODE AT [AT2]

Every file-system call a save makes (``os.write``, ``os.fsync``, ``os.mkdir``, ``os.rename``, ``os.replace``,
``os.unlink``, ``os.rmdir``) is counted across the run's saves; at call ``AT`` (1-based):
- ``kill``: ``SIGKILL`` to itself, just before the call (nothing runs after it: no cleanup, no flush);
- ``sigint``: a first ``SIGINT`` (Ctrl-C: stop after this step and save), and at call ``AT2`` a second one (which
  interrupts whatever runs, the save included); the process then exits 130 like ``attnkit``;
- ``count``: nothing; print the number of calls the run's saves made.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from attnkit.tasks.translate import checkpoint as ckpt
from attnkit.tasks.translate.config import TrainConfig
from attnkit.tasks.translate.train import train

CONFIG = dict(hidden=8, embed_dim=4, epochs=3, batch_size=256, seed=3, dropout=0.2)
CALLS = ("write", "fsync", "mkdir", "rename", "replace", "unlink", "rmdir")


def main(out: str, mode: str, at: int, at2: int) -> int:
    torch.set_num_threads(1)
    state = {"in_save": False, "n": 0}

    def hook():
        if not state["in_save"]:
            return
        state["n"] += 1
        n = state["n"]
        if mode == "kill" and n == at:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "sigint" and n in (at, at2):
            os.kill(os.getpid(), signal.SIGINT)

    for name in CALLS:
        real = getattr(os, name)

        def wrapped(*args, _real=real, **kwargs):
            hook()
            return _real(*args, **kwargs)

        setattr(os, name, wrapped)
    real_save = ckpt.save_checkpoint

    def save(*args, **kwargs):
        state["in_save"] = True
        try:
            return real_save(*args, **kwargs)
        finally:
            state["in_save"] = False

    ckpt.save_checkpoint = save
    try:
        result = train(TrainConfig(**CONFIG), out, progress=False)
    except KeyboardInterrupt:
        print(json.dumps({"calls": state["n"], "status": "KeyboardInterrupt"}))
        return 130
    print(json.dumps({"calls": state["n"], "status": result["status"]}))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[0], args[1], int(args[2]) if len(args) > 2 else 0, int(args[3]) if len(args) > 3 else 0))
