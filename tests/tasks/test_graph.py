"""``attnkit graph`` end to end: a karate-club run through the CLI, a few Cora epochs, clear data-path errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnkit.cli import main
from attnkit.tasks.graph import EarlyStopping, karate_club

CORA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cora"


def test_karate_club_data_matches_zachary():
    d = karate_club(labels_per_class=2, seed=0)
    # Zachary 1977: 34 members, 78 friendships, the club split 17 / 17 (Mr. Hi / Officer)
    assert d.num_nodes == 34 and d.edge_index.shape == (2, 156)
    assert torch.bincount(d.y).tolist() == [17, 17]
    assert d.y[0] == 0 and d.y[33] == 1  # the instructor and the administrator
    assert torch.bincount(d.y[d.train_idx]).tolist() == [2, 2]
    assert len(set(d.train_idx.tolist()) & set(d.test_idx.tolist())) == 0 and len(d.test_idx) == 30


def test_early_stopping_follows_the_papers_rule():
    es = EarlyStopping(patience=2)
    seq = [(1.00, 0.50), (0.90, 0.50), (0.95, 0.60), (0.95, 0.55), (0.85, 0.60), (0.99, 0.10), (0.99, 0.10)]
    got = [es.step(loss, acc) for loss, acc in seq]
    assert got == ["keep", "keep", "improved", "wait", "keep", "wait", "stop"]


def test_karate_run_with_no_data_writes_metrics_and_picture(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["graph", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "karate" and m["nodes"] == 34 and len(m["runs"]) == 1
    # 4 labelled members; predicting the majority club would give 15/30 = 0.5
    assert m["test_acc_mean"] >= 0.75
    assert m["runs"][0]["epochs"] == 200 and m["seconds_per_run_mean"] > 0
    assert (out / "karate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.skipif(not (CORA / "ind.cora.x").is_file(), reason="../shared/data/cora not present")
def test_cora_few_epochs(tmp_path):
    out = tmp_path / "cora"
    rc = main(["graph", "--data", str(CORA), "--dataset", "cora", "--epochs", "6", "--patience", "2",
               "--seeds", "2", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == {"train": 140, "val": 500, "test": 1000}
    assert (m["nodes"], m["features"], m["classes"]) == (2708, 1433, 7)
    assert [r["seed"] for r in m["runs"]] == [0, 1]
    for r in m["runs"]:
        assert 1 <= r["kept_epoch"] <= r["epochs"] <= 6
        assert 0.0 <= r["test_acc"] <= 1.0
    assert (out / "attention_entropy.png").is_file()


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    rc = main(["graph", "--data", str(missing), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "expected a folder holding ind.cora.x" in err
    (tmp_path / "empty").mkdir()
    rc = main(["graph", "--data", str(tmp_path / "empty"), "--dataset", "pubmed", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "missing Planetoid file" in capsys.readouterr().err


def test_bad_options_are_refused_before_training(tmp_path, capsys):
    """``--heads 0`` printed a traceback; ``--labels-per-class 0`` trained on nothing and wrote NaN with
    ``"complete": true``. Both are now argparse errors, and the library refuses the empty training set too."""
    import pytest

    from attnkit.cli import main

    for argv, message in ((["--heads", "0"], "argument --heads: expected an int >= 1, got '0'"),
                          (["--seeds", "0"], "argument --seeds: expected an int >= 1, got '0'"),
                          (["--labels-per-class", "0"], "argument --labels-per-class: expected an int in [1, 16]")):
        with pytest.raises(SystemExit) as exc:
            main(["graph", *argv, "--out", str(tmp_path / "g")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()
    with pytest.raises(ValueError, match=r"labels_per_class must be in \[1, 16\]"):
        karate_club(labels_per_class=0)
