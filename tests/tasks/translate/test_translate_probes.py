"""The probes of issue 15, each a test: what a new user types wrong gets one line naming the option, field or
file, what was expected and what came (exit 2 for a bad option, 1 for a bad file), and never a traceback."""

from __future__ import annotations

import json
import os
import stat

import pytest

from attnkit.cli import main

TINY = ["--hidden", "8", "--embed-dim", "4", "--epochs", "1", "--batch-size", "256", "--no-progress"]


def _parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("option, value, expected", [
    ("--test-frac", "0", "expected a finite number in (0.0, 1.0)"),
    ("--valid-frac", "1.5", "expected a finite number in [0.0, 1.0)"),
    ("--max-pairs", "0", "expected an int >= 1"),
    ("--dropout", "2", "expected a finite number in [0.0, 1.0)"),
    ("--lr", "-1", "expected a finite number in (0.0, inf]"),
    ("--lr", "nan", "expected a finite number in (0.0, inf]"),
    ("--label-smoothing", "2", "expected a finite number in [0.0, 1.0)"),
    ("--min-freq", "0", "expected an int >= 1"),
    ("--embed-dim", "0", "expected an int >= 1"),
    ("--lang", "xx", "invalid choice: 'xx'"),
    ("--score", "bogus", "invalid choice: 'bogus'"),
    ("--seed", "99999999999999999999", "expected an int in [0, 2147483647]"),
])
def test_bad_training_options_are_refused_at_parse_time(tmp_path, capsys, option, value, expected):
    line = _parse_error(["translate", "train", "--out", str(tmp_path / "r"), f"{option}={value}"], capsys)
    assert line == f"attnkit translate train: error: argument {option}: {expected}, got {value!r}" or \
        (expected in line and option in line), line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "transformer", "--hidden", "10", "--num-heads", "4"],
     "hidden must be divisible by num_heads for the Transformer; got hidden 10, num_heads 4"),
    (["--valid-frac", "0.5", "--test-frac", "0.5"], "valid_frac + test_frac must be < 1"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
])
def test_options_that_do_not_go_together(tmp_path, capsys, argv, message):
    assert main(["translate", "train", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def _data(path, n=60, extra=""):
    path.write_text("".join(f"w{i} go home .\tv{i} rentre .\n" for i in range(n)) + extra, encoding="utf-8")
    return path


def test_data_too_small_for_the_held_out_split_is_refused_before_training(tmp_path, capsys):
    data = _data(tmp_path / "three.tsv", n=3)
    assert main(["translate", "train", "--data", str(data), "--out", str(tmp_path / "r"), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 pairs are too few for a held-out test split of test_frac 0.1" in err
    assert not (tmp_path / "r" / "checkpoint.json").exists()


def test_min_freq_that_keeps_no_word_is_refused_before_training(tmp_path, capsys):
    assert main(["translate", "train", "--out", str(tmp_path / "r"), "--min-freq", "1000", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "min_freq 1000 keeps no source word of the training split" in err


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys):
    argv = ["translate", "train", "--out", str(tmp_path / "r"), "--model", "transformer", "--hidden", "1000000",
            "--num-heads", "1", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GiB" in err and "choose smaller sizes" in err


def test_resume_refuses_changed_options_and_names_them(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["translate", "train", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["translate", "train", "--out", str(out), "--resume", "--hidden", "16", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--hidden 16 (saved 8)" in err and "--lr 0.01 (saved 0.005)" in err
    # the same values, or only --epochs: fine, and the message names the run's own data
    assert main(["translate", "train", "--out", str(out), "--resume", "--hidden", "8", "--epochs", "2",
                 "--no-progress"]) == 0
    assert "training bahdanau on the embedded date task" in capsys.readouterr().out


def test_eval_from_another_directory_finds_a_relative_data_path(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    _data(work / "pairs.tsv")
    monkeypatch.chdir(work)
    assert main(["translate", "train", "--data", "pairs.tsv", "--out", "run", "--min-freq", "1", *TINY]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["translate", "eval", "--run", "work/run", "--out", str(tmp_path / "ev")]) == 0
    metrics = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    assert json.loads(metrics)["sentences"] == 6


def test_a_form_feed_inside_a_line_does_not_split_it(tmp_path):
    from attnkit.tasks.translate.data import load_pairs

    path = tmp_path / "ff.tsv"
    path.write_text("go\x0chome .\tva\x0cà la maison .\nhi .\tsalut .\r\n", encoding="utf-8")
    pairs = load_pairs(path)
    assert [(p.src, p.tgt, p.line) for p in pairs] == [
        (["go", "home", "."], ["va", "à", "la", "maison", "."], 1), (["hi", "."], ["salut", "."], 2)]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_files_follow_the_umask(tmp_path, umask):
    out = tmp_path / "r"
    old = os.umask(umask)
    try:
        assert main(["translate", "train", "--out", str(out), *TINY]) == 0
    finally:
        os.umask(old)
    files = [out / "metrics.json", out / "samples.txt", out / "checkpoint.json",
             *(out / "checkpoints").glob("*/*"), *(out / "heatmaps").glob("*.png")]
    assert len(files) > 5
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_edited_checkpoint_is_a_one_line_error_in_predict(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["translate", "train", "--out", str(out), *TINY]) == 0
    snapshot = out / json.loads((out / "checkpoint.json").read_text())["snapshot"]
    meta = json.loads((snapshot / "meta.json").read_text())
    meta["tgt_vocab"].reverse()  # would silently change every translation
    (snapshot / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["translate", "predict", "--run", str(out), "monday march four"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "meta.json: does not match" in err and "checksum differs" in err
