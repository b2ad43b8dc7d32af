"""A data file trains with the subword vocabulary end to end (the default for a file): nothing becomes <unk>,
outputs come back as normal text in their own script, the vocabulary is saved inside the checkpoint (JSON, never
pickled) and the report carries sacreBLEU 13a and chrF with their signatures beside the historic BLEU."""

from __future__ import annotations

import json

import pytest

from attnkit.cli import main
from attnkit.tasks.translate.checkpoint import load_checkpoint, load_trained
from attnkit.tasks.translate.vocabulary import SubwordTokens

ROWS = [("I'm home.", "我回家了。"), ("I lost.", "我输了。"), ("Go home.", "回家吧。"), ("Who is he?", "他是谁？"),
        ("I am here.", "我在这里。"), ("He is home.", "他在家。"), ("I'm here.", "我在这儿。"),
        ("He lost.", "他输了。"), ("Who am I?", "我是谁？"), ("Go!", "走吧！"), ("He is here.", "他在这里。"),
        ("Who lost?", "谁输了？")]
SMALL = ["--model", "transformer", "--hidden", "32", "--num-heads", "2", "--ff-dim", "64", "--num-layers", "1",
         "--dropout", "0", "--epochs", "40", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "0",
         "--schedule", "constant", "--label-smoothing", "0", "--vocab-size", "300", "--valid-frac", "0",
         "--test-frac", "0.2", "--no-progress"]


@pytest.fixture(scope="module")
def cmn_run(tmp_path_factory):
    """A Tatoeba cmn-eng export's shape: a byte-order mark, three columns, Chinese without spaces."""
    root = tmp_path_factory.mktemp("cmn")
    data = root / "cmn.txt"
    data.write_bytes(("\ufeff" + "".join(f"{en}\t{zh}\tCC-BY 2.0 (France) Attribution: tatoeba.org #{i}\n"
                                         for i, (en, zh) in enumerate(ROWS))).encode("utf-8"))
    run = root / "run"
    assert main(["translate", "train", "--data", str(data), "--out", str(run), *SMALL]) == 0
    return data, run


def test_the_vocabulary_is_subword_json_inside_the_checkpoint(cmn_run):
    _, run = cmn_run
    meta, _ = load_checkpoint(run)
    assert meta["train"]["vocab"] == "subword"
    assert isinstance(meta["src_vocab"], dict) and meta["src_vocab"]["kind"] == "bpe-bytelevel"
    _, _, src_vocab, tgt_vocab = load_trained(run)
    assert isinstance(src_vocab, SubwordTokens) and isinstance(tgt_vocab, SubwordTokens)


def test_report_has_the_three_scores_with_signatures_and_no_unk(cmn_run):
    _, run = cmn_run
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    for key in ("bleu", "bleu_13a", "chrf"):
        assert 0.0 <= metrics[key] <= 100.0
    assert "tok:13a" in metrics["bleu_13a_signature"] and "case:lc" in metrics["bleu_13a_signature"]
    assert metrics["chrf_signature"].startswith("nrefs:")
    assert metrics["unk_outputs"] == 0 and metrics["decoding"].startswith("beam 4")
    assert "<unk>" not in (run / "samples.txt").read_text(encoding="utf-8")


def test_predict_gives_back_what_it_learned_in_solid_chinese_and_takes_unseen_words(cmn_run, capsys):
    from attnkit.tasks.translate.train import TrainConfig, load_splits

    _, run = cmn_run
    meta, _ = load_checkpoint(run)
    splits = load_splits(TrainConfig.from_dict(meta["train"]))
    train = {p.extra["src_text"]: p.extra["tgt_text"] for p in splits["train"]}
    assert len(train) == 10
    capsys.readouterr()
    assert main(["translate", "predict", "--run", str(run), *train, "Zorglub xylophones!"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(train) + 1  # the unseen words are translated, not refused
    assert all(" " not in line and "<unk>" not in line and line for line in out)
    learned = sum(line == want for line, want in zip(out, train.values(), strict=False))
    assert learned >= 8, list(zip(out, train.values(), strict=False))  # a tiny model memorizes its 10 pairs


def test_eval_prints_the_standard_scores(cmn_run, capsys):
    _, run = cmn_run
    capsys.readouterr()
    assert main(["translate", "eval", "--run", str(run), "--beam", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert {"bleu", "bleu_13a", "chrf", "bleu_13a_signature", "chrf_signature"} <= set(printed)
    assert printed["decoding"] == "beam 2, length penalty 1"
