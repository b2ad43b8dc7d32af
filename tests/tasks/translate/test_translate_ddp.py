"""`attnkit translate train` under torchrun (2 gloo processes on loopback): DistributedDataParallel over shards of
each global batch gives each step's loss within 1e-4 (relative) of the single-process run (dropout 0), only rank
0 takes the run directory, and --resume continues the data-parallel run exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from attnkit.tasks.translate import train as train_module
from attnkit.tasks.translate.checkpoint import load_checkpoint
from attnkit.tasks.translate.runlock import LOCK

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[2] / "src"
SMALL = ["--hidden", "16", "--embed-dim", "8", "--dropout", "0", "--batch-size", "64", "--seed", "3",
         "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(P: int, record: Path, argv: list[str], timeout: float = 120) -> list[dict]:
    """``attnkit <argv>`` on ``P`` ranks with torchrun's variables; each rank's record."""
    port = _free_port()
    procs = []
    for r in range(P):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(P),
                   LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(P), OMP_NUM_THREADS="1", ATTNKIT_DIST_TIMEOUT="60",
                   PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "ddp_worker.py"), str(record), *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-3000:]}"
    return [json.loads(Path(f"{record}.{r}.json").read_text()) for r in range(P)]


def _global_steps(records: list[dict]) -> list[float]:
    """Per step, the global batch's mean token loss from every rank's (sum, count)."""
    n = {len(r["steps"]) for r in records}
    assert len(n) == 1, f"the ranks took different numbers of steps: {n}"
    return [sum(r["steps"][i][0] for r in records) / sum(r["steps"][i][1] for r in records)
            for i in range(n.pop())]


def _single(tmp_path: Path, epochs: int, monkeypatch) -> list[float]:
    from attnkit.cli import main

    steps = []
    build = train_module.build_model

    def recording_build(config):
        model = build(config)
        loss = model.loss

        def recorded(*a, **k):
            out = loss(*a, **k)
            if model.training:
                steps.append(float(out[0].detach()) / int(out[1]))
            return out

        model.loss = recorded
        return model

    monkeypatch.setattr(train_module, "build_model", recording_build)
    assert main(["translate", "train", "--out", str(tmp_path / "single"), "--epochs", str(epochs), *SMALL]) == 0
    return steps


def test_torchrun_data_parallel_matches_one_process_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "ddp"
    first = torchrun(2, tmp_path / "a", ["translate", "train", "--out", str(out), "--epochs", "1", *SMALL])
    assert (out / LOCK).read_text().strip() == str(first[0]["pid"])  # rank 0 held the directory, not rank 1
    meta, _ = load_checkpoint(out)
    assert meta["status"] == "done" and len(meta["history"]) == 1
    again = torchrun(2, tmp_path / "b", ["translate", "train", "--out", str(out), "--resume", "--epochs", "2",
                                         *SMALL[-1:]])
    ddp = _global_steps(first) + _global_steps(again)
    single = _single(tmp_path, 2, monkeypatch)
    assert len(ddp) == len(single) > 40
    worst = max(abs(a - b) / abs(b) for a, b in zip(ddp, single, strict=True))
    print(f"{len(ddp)} steps, largest relative step-loss difference {worst:.3g}")
    assert worst <= 1e-4, f"largest relative step-loss difference {worst:.3g}"
    assert single[-1] < 0.7 * single[0]  # it trained
    meta, _ = load_checkpoint(out)
    assert meta["status"] == "done" and len(meta["history"]) == 2
    assert (tmp_path / "single" / "checkpoint.json").is_file()


def test_a_refused_command_stops_every_rank(tmp_path):
    """Rank 0 refuses (nothing to resume in --out): the other rank ends with the same code, not left waiting."""
    port = _free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               ATTNKIT_DIST_TIMEOUT="30", PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "attnkit", "translate", "train", "--out", str(tmp_path / "x"), "--resume"]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0 and "error" in outs[0]
    assert procs[1].returncode == procs[0].returncode, outs[1]
