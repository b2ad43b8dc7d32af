"""Crash safety, tested by causing the crashes: ``kill -9`` and a double Ctrl-C at seeded random points of a
checkpoint save, a full disk (``OSError(ENOSPC)``) at each file-system call of a save, and two trainers on one
run directory. After each, the run directory loads (the previous or the new checkpoint) and resuming ends with
exactly the weights and history of a run that was never interrupted.

``make test`` runs a few seeded trials of each signal; the full 50 of each:

    ATTNKIT_FAULT_TRIALS=50 OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/tasks/translate/test_translate_faults.py
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnkit.tasks.translate import checkpoint as ckpt
from attnkit.tasks.translate.config import TrainConfig
from attnkit.tasks.translate.errors import TranslateError
from attnkit.tasks.translate.train import train

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[2] / "src"
sys.path.insert(0, str(HERE))
from fault_child import CALLS, CONFIG  # noqa: E402

TRIALS = int(os.environ.get("ATTNKIT_FAULT_TRIALS", "2"))


def _child(out: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(HERE / "fault_child.py"), str(out), *args], env=env,
                          capture_output=True, text=True, timeout=300, check=check)


def _plain(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


class _Faults:
    """Counts the file-system calls made inside ``checkpoint.save_checkpoint`` (per save) and raises
    ``OSError(ENOSPC)`` at call ``fail_at`` (1-based over the whole run; 0 = never)."""

    def __init__(self, monkeypatch):
        self.fail_at, self.n, self.per_save, self.in_save = 0, 0, [], False
        for name in CALLS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))
        real_save = ckpt.save_checkpoint

        def save(*args, **kwargs):
            self.in_save = True
            self.per_save.append(0)
            try:
                return real_save(*args, **kwargs)
            finally:
                self.in_save = False

        monkeypatch.setattr(ckpt, "save_checkpoint", save)

    def _wrap(self, real):
        def wrapped(*args, **kwargs):
            if self.in_save:
                self.n += 1
                self.per_save[-1] += 1
                if self.n == self.fail_at:
                    raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            return real(*args, **kwargs)

        return wrapped


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process) and the number of file-system calls of each of its saves."""
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        faults = _Faults(mp)
        result = train(TrainConfig(**CONFIG), tmp_path_factory.mktemp("ref"), progress=False)
    return {"weights": {k: v.clone() for k, v in result["model"].state_dict().items()},
            "history": _plain(result["history"]), "calls": faults.n, "per_save": faults.per_save}


def _assert_recovers(out: Path, reference) -> str:
    """The directory loads (or holds no checkpoint yet); resuming (or starting) ends as the reference run."""
    try:
        meta, _ = ckpt.load_checkpoint(out)
        state = f"loads ({meta['status']} at step {meta['progress']['global_step']})"
        resume = True
    except TranslateError as exc:
        assert "checkpoint file not found" in str(exc) and "checkpoint.json" in str(exc), exc
        state, resume = "no checkpoint yet", False
    result = train(TrainConfig(**CONFIG), out, resume=resume, progress=False)
    assert result["status"] == "done"
    weights = result["model"].state_dict()
    assert all(torch.equal(weights[k], v) for k, v in reference["weights"].items()), state
    assert _plain(result["history"]) == reference["history"], state
    assert not list((out / "checkpoints").glob("*.partial")), state
    assert len(list((out / "checkpoints").iterdir())) <= 2, state
    return state


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_at_a_random_point_of_a_save(tmp_path, reference, trial):
    at = random.Random(9000 + trial).randint(1, reference["calls"])
    proc = _child(tmp_path, "kill", str(at))
    assert proc.returncode == -9, (at, proc.returncode, proc.stderr[-2000:])
    _assert_recovers(tmp_path, reference)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_double_ctrl_c_at_random_points_of_a_save(tmp_path, reference, trial):
    rng = random.Random(2000 + trial)
    at = rng.randint(1, reference["calls"])
    at2 = at + rng.randint(1, 12)  # the second Ctrl-C soon after the first: often inside the same save
    proc = _child(tmp_path, "sigint", str(at), str(at2))
    assert proc.returncode in (0, 130), (at, at2, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    _assert_recovers(tmp_path, reference)


def test_full_disk_at_each_call_of_a_save(tmp_path, reference, monkeypatch):
    """``OSError(ENOSPC)`` at each file-system call of the run's last save (the one that also collects an old
    snapshot, so it makes every kind of call; the first saves make the same calls minus the collection).
    ``make test`` takes every third call; ``ATTNKIT_FAULT_TRIALS=50`` every call of the second and third saves."""
    assert len(reference["per_save"]) == 3
    full = TRIALS >= 50
    first = reference["per_save"][0] + (0 if full else reference["per_save"][1])
    faults = _Faults(monkeypatch)
    outcomes = []
    for n in range(first + 1, sum(reference["per_save"]) + 1, 1 if full else 3):
        out = tmp_path / f"n{n}"
        faults.fail_at, faults.n, faults.per_save = n, 0, []
        try:
            train(TrainConfig(**CONFIG), out, progress=False)
            raised = False  # a failed deletion of an old snapshot is ignored: it goes at the next save
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            raised = True
        faults.fail_at = 0
        outcomes.append((raised, _assert_recovers(out, reference)))
    # a fault that does not surface (in an exist_ok mkdir of a folder that is there, or in deleting an old
    # snapshot, which the next save retries) must not have stopped training: the run finished
    assert all(raised or state == "loads (done at step 30)" for raised, state in outcomes), outcomes
    assert sum(r for r, _ in outcomes) >= len(outcomes) // 2, outcomes
    assert any("step 20" in s for _, s in outcomes) and any("step 30" in s for _, s in outcomes), outcomes


def test_a_second_trainer_on_the_same_run_is_refused_until_the_first_ends(tmp_path, reference, capsys):
    """A trainer (another process) holds the run; a second one, through the CLI, gets a one-line refusal and
    changes nothing; once the first is killed with -9 the kernel has released its lock and training goes on."""
    from attnkit.cli import main

    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from attnkit.tasks.translate.runlock import run_lock\n"
        f"with run_lock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(120)")],
        env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["translate", "train", "--out", str(tmp_path), "--hidden", "8", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
        assert f"another trainer (pid {holder.pid}) is using this run directory" in err
        assert not (tmp_path / "checkpoint.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    _assert_recovers(tmp_path, reference)


def test_two_trainers_started_together_one_wins_the_other_is_refused(tmp_path, reference):
    """Two real trainers at once on one --out: exactly one trains (exit 0), the other is refused (exit 1)."""
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "attnkit", "translate", "train", "--out", str(tmp_path), "--no-progress",
           *[f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items()]]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.05)
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    assert "is using this run directory" in loser[2] and "Traceback" not in loser[2]
    meta, _ = ckpt.load_checkpoint(tmp_path)
    assert meta["status"] == "done" and _plain(meta["history"]) == reference["history"]


def test_a_first_format_run_resumes_and_is_converted(tmp_path, reference):
    """A run saved by the first format (checkpoint.json + weights.safetensors side by side) after epoch 2 resumes
    to the uninterrupted run's weights, and its next save leaves only the current format behind."""
    import hashlib
    import json
    import shutil

    cfg = TrainConfig(**{**CONFIG, "epochs": 2})
    train(cfg, tmp_path, progress=False)
    meta, _ = ckpt.load_checkpoint(tmp_path)
    blob = (ckpt.current_snapshot(tmp_path) / "weights.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "weights.safetensors").write_bytes(blob)
    (tmp_path / "checkpoint.json").write_text(json.dumps(
        {**meta, "format": "attnkit-translate/1", "weights_sha256": hashlib.sha256(blob).hexdigest()}))
    result = train(TrainConfig(**CONFIG), tmp_path, resume=True, progress=False)
    weights = result["model"].state_dict()
    assert all(torch.equal(weights[k], v) for k, v in reference["weights"].items())
    assert _plain(result["history"]) == reference["history"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoints", "run.lock"]
