"""``attnkit translate``: the demo path end to end, and one-line errors (no traceback) for user mistakes."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from attnkit.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("translate") / "run"
    code = main(["translate", "train", "--out", str(out), "--epochs", "3", "--hidden", "48", "--embed-dim", "24",
                 "--no-progress"])
    assert code == 0
    return out


def test_train_writes_metrics_samples_and_pictures(run_dir, capsys):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["exact_match"] > 0.8 and metrics["alignment_accuracy"] > 0.6
    assert metrics["sentences"] == 293 and metrics["epochs"] == 3
    assert "src: " in (run_dir / "samples.txt").read_text()
    pngs = sorted((run_dir / "heatmaps").glob("*.png"))
    assert len(pngs) == 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_predict_arguments_and_stdin(run_dir, capsys, monkeypatch):
    assert main(["translate", "predict", "--run", str(run_dir), "Monday March twenty four"]) == 0
    assert capsys.readouterr().out.strip() == "lundi vingt quatre mars"
    monkeypatch.setattr("sys.stdin", io.StringIO("sunday june nine\n\nfriday may thirty one\n"))
    assert main(["translate", "predict", "--run", str(run_dir), "--beam", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == ["dimanche neuf juin", "vendredi trente et un mai"]


def test_predict_unknown_words_is_a_clear_error(run_dir, capsys):
    assert main(["translate", "predict", "--run", str(run_dir), "monday march four", "blorp march four"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "sentence 2: unknown word(s) 'blorp'" in err
    assert main(["translate", "predict", "--run", str(run_dir), "--allow-unknown", "blorp march four"]) == 0


def test_eval_and_resume(run_dir, tmp_path, capsys):
    assert main(["translate", "eval", "--run", str(run_dir), "--out", str(tmp_path / "ev")]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert printed["exact_match"] == saved["exact_match"]
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["translate", "train", "--out", str(copy), "--epochs", "3", "--hidden", "32"]) == 1
    assert "already holds another or an unfinished run" in capsys.readouterr().err
    # the same command again (`make demo` twice) evaluates the finished run instead of failing
    again = ["translate", "train", "--out", str(copy), "--epochs", "3", "--hidden", "48", "--embed-dim", "24",
             "--no-progress"]
    assert main(again) == 0
    assert "already holds this finished run" in capsys.readouterr().out
    assert json.loads((copy / "metrics.json").read_text())["exact_match"] == saved["exact_match"]
    assert main(["translate", "train", "--out", str(copy), "--resume", "--epochs", "4", "--no-progress"]) == 0
    assert json.loads((copy / "metrics.json").read_text())["epochs"] == 4


def test_corrupt_checkpoint_is_a_one_line_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    w = next((bad / "checkpoints").glob(json.loads((bad / "checkpoint.json").read_text())["snapshot"][12:]))
    w = w / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    assert main(["translate", "predict", "--run", str(bad), "monday march four"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights.safetensors" in err and "checksum" in err
    assert main(["translate", "eval", "--run", str(tmp_path / "nothing")]) == 1
    assert "checkpoint file not found" in capsys.readouterr().err


def test_bad_data_file_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "pairs.tsv"
    data.write_text("go .\tva !\njust one column\n", encoding="utf-8")
    assert main(["translate", "train", "--data", str(data), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:2: expected source<TAB>target" in err
    assert main(["translate", "train", "--data", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "r")]) == 1
    assert "data file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["translate", "train", "--beam", "0"])
    assert exc.value.code == 2 and "argument --beam: expected an int in [1, 100], got '0'" in capsys.readouterr().err


def test_time_limit_saves_says_how_far_it_got_and_resume_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["translate", "train", "--out", str(out), "--epochs", "2", "--hidden", "32", "--embed-dim", "16",
            "--no-progress"]
    assert main([*args, "--max-minutes", "0.0001"]) == 0  # stops after its first step, then evaluates
    printed = capsys.readouterr().out
    assert "time limit reached (0.0001 min) with 0 of 2 epochs complete" in printed
    assert "`--resume` continues" in printed
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 0
    assert main(["translate", "train", "--out", str(out), "--resume", "--max-minutes", "60", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2 of 2: train loss" in printed and "time limit" not in printed
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
