"""Data-parallel training of the translation recipe under ``torchrun`` (``DistributedDataParallel``, gloo on CPU).

    torchrun --nproc-per-node 2 -m attnkit translate train --out runs/ddp

Every rank builds the same epoch batches (a function of the seed and the epoch), reads its contiguous shard of
each global batch, and backpropagates ``P * (its summed token loss) / (global token count)``, so that DDP's
gradient average is the single-process gradient of the global batch: with dropout 0 each step's loss equals the
one-process run's to float rounding. Every rank takes the same steps: a stop (Ctrl-C, ``--max-minutes``) seen by
one rank is agreed on by all after the step. Rank 0 alone takes the run-directory lock, decides what the command
means (new run, ``--resume``, ``--overwrite``), writes the checkpoints and the report; the other ranks receive
the run's config from it and train with it. The single-process path does not come here.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

ENV_TIMEOUT = "ATTNKIT_DIST_TIMEOUT"  # seconds any collective may wait (default 300)
_STATUSES = ("done", "time limit", "interrupted")


def world_size() -> int:
    """The ``WORLD_SIZE`` torchrun gave this process (1 when not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current() -> DataParallel | None:
    """The data-parallel context of this process, or None on a single process."""
    return _CURRENT


_CURRENT: DataParallel | None = None


class _Loss(nn.Module):
    """``model.loss`` as a module's forward, so DistributedDataParallel's hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.loss(*args, **kwargs)


class DataParallel:
    """This rank's place in the data-parallel group and the few collective steps the training loop takes."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self._weight = 1.0

    def wrap(self, model: nn.Module):
        """The loss callable of ``model`` under DistributedDataParallel (same arguments as ``model.loss``)."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(_Loss(model))

    def shard(self, batch: list) -> list:
        """This rank's contiguous part of a global batch; a rank left without items gets the first item, counted
        with weight 0 (every rank must run the forward and backward of every step)."""
        n, P, r = len(batch), self.size, self.rank
        start = r * (n // P) + min(r, n % P)
        mine = batch[start:start + n // P + (1 if r < n % P else 0)]
        self._weight = 1.0 if mine else 0.0
        return mine or batch[:1]

    def backward(self, loss: torch.Tensor, n_tok: int) -> tuple[torch.Tensor, int]:
        """Backpropagate this rank's share of the global batch's mean token loss; the global ``(loss sum, token
        count)``, as one process would have them."""
        loss = loss * self._weight
        n_tok = int(n_tok * self._weight)
        total = torch.tensor([float(loss.detach()), float(n_tok)], dtype=torch.float64)
        self.dist.all_reduce(total)  # (2,): sums over the ranks
        (loss * (self.size / total[1].item())).backward()  # DDP averages over ranks: sum_r loss_r / N
        return total[0], int(total[1].item())

    def agree(self, status: str) -> str:
        """The status every rank takes after a step: the most urgent any rank reached."""
        code = torch.tensor([_STATUSES.index(status)], dtype=torch.int64)
        self.dist.all_reduce(code, op=self.dist.ReduceOp.MAX)
        return _STATUSES[int(code.item())]

    def barrier(self) -> None:
        self.dist.barrier()

    def share(self, obj):
        """Rank 0's ``obj`` on every rank (JSON-like data: a vocabulary learned once, the same on all ranks)."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def announce(self, cfg, resume: bool) -> None:
        """Rank 0: tell the other ranks which run to train (they wait in :func:`cmd_train`)."""
        import dataclasses

        self.dist.broadcast_object_list([("train", dataclasses.asdict(cfg), resume)], src=0)
        self.announced = True


def cmd_train(args, cfg, train_locked) -> int:
    """``attnkit translate train`` on every rank of a torchrun job (``train_locked`` is the CLI's own body)."""
    global _CURRENT
    import torch.distributed as dist

    from attnkit.tasks.translate.config import TrainConfig
    from attnkit.tasks.translate.runlock import run_lock

    seconds = float(os.environ.get(ENV_TIMEOUT, "300"))
    dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))
    _CURRENT = par = DataParallel()
    try:
        if par.is_main:
            par.announced = False
            rc = 1
            try:
                with run_lock(args.out):  # rank 0 alone holds the run directory
                    rc = train_locked(args, cfg, Path(args.out))
            finally:
                if not par.announced:  # refused before training (or failed): release the waiting ranks
                    dist.broadcast_object_list([("stop", rc, None)], src=0)
            return rc
        msg = [None]
        dist.broadcast_object_list(msg, src=0)
        kind, what, resume = msg[0]
        if kind == "stop":  # rank 0 refused the command (and said why) or failed: end with its code
            return what
        from attnkit.tasks.translate.train import train

        if args.threads is not None or TrainConfig.from_dict(what).data == "embedded":
            torch.set_num_threads(args.threads or 1)
        train(TrainConfig.from_dict(what), args.out, resume=resume, progress=False)
        return 0
    finally:
        _CURRENT = None
        dist.destroy_process_group()
