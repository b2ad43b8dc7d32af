"""Training: a short run learns the embedded task; an interrupted and resumed run equals an uninterrupted one."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from attnkit.tasks.translate.evaluate import evaluate
from attnkit.tasks.translate.train import TrainConfig, epoch_batches, learning_rate, train


def test_short_run_learns_the_embedded_task_well_above_chance(tmp_path):
    cfg = TrainConfig(hidden=48, embed_dim=24, epochs=2, batch_size=32, seed=1)
    result = train(cfg, tmp_path, progress=False)
    assert result["status"] == "done" and len(result["history"]) == 2
    assert result["history"][1]["train_loss"] < result["history"][0]["train_loss"]
    metrics, samples = evaluate(result["model"], result["splits"]["test"], result["src_vocab"],
                                result["tgt_vocab"])
    # chance: exact match ~ 0 (2,928 distinct dates); alignment ~ 1/3.6 (a source has 2-4 words)
    assert metrics["exact_match"] > 0.8, metrics
    assert metrics["alignment_accuracy"] > 0.6, metrics
    assert metrics["bleu"] > 80


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["bahdanau", "transformer"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, kind):
    # the Transformer runs with warm-up and linear decay: the schedule must resume exactly too
    schedule = dict(warmup_steps=10, schedule="linear") if kind == "transformer" else {}
    cfg = TrainConfig(model=kind, hidden=16, embed_dim=8, num_heads=2, ff_dim=32, num_layers=1, dropout=0.3,
                      epochs=2, batch_size=64, seed=7, **schedule)
    whole = train(cfg, tmp_path / "whole", progress=False)

    def ctrl_c_at_step_50(step):  # mid-way through the second epoch (39 batches per epoch)
        if step == 50:
            os.kill(os.getpid(), signal.SIGINT)

    part = train(cfg, tmp_path / "part", progress=False, on_step=ctrl_c_at_step_50)
    assert part["status"] == "interrupted" and len(part["history"]) == 1
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["status"] == "done"
    w1, w2 = _weights(whole["model"]), _weights(resumed["model"])
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    drop_time = [{k: v for k, v in h.items() if k != "seconds"} for h in whole["history"]]
    assert drop_time == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]]
    test = whole["splits"]["test"][:60]
    m1, _ = evaluate(whole["model"], test, whole["src_vocab"], whole["tgt_vocab"])
    m2, _ = evaluate(resumed["model"], test, resumed["src_vocab"], resumed["tgt_vocab"])
    assert m1 == m2


def test_epoch_batches_cover_every_pair_once_and_depend_on_seed_and_epoch():
    lengths = [i % 7 + 1 for i in range(250)]
    b = epoch_batches(lengths, 16, seed=3, epoch=0)
    assert sorted(i for batch in b for i in batch) == list(range(250))
    assert b == epoch_batches(lengths, 16, seed=3, epoch=0)
    assert b != epoch_batches(lengths, 16, seed=3, epoch=1)
    assert b != epoch_batches(lengths, 16, seed=4, epoch=0)


def test_learning_rate_warms_up_linearly_then_decays_to_zero_at_the_last_step():
    cfg = TrainConfig(lr=0.01, warmup_steps=4, schedule="linear", epochs=2)
    lrs = [learning_rate(cfg, t, steps_per_epoch=10) for t in range(20)]
    assert lrs[:4] == pytest.approx([0.0025 * 1.0, 0.0025 * 2 * 0.95, 0.0025 * 3 * 0.9, 0.01 * 0.85])
    assert lrs[4:] == pytest.approx([0.01 * (1 - t / 20) for t in range(4, 20)])
    assert learning_rate(TrainConfig(lr=0.01), 123, 10) == 0.01  # constant, no warm-up


@pytest.mark.parametrize("bad", [dict(schedule="cosine"), dict(warmup_steps=-1)])
def test_bad_schedule_options_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig.from_dict(bad)


@pytest.mark.parametrize("kind", ["bahdanau", "transformer"])
def test_model_loss_scores_only_real_tokens_like_the_full_logits(kind):
    from attnkit.tasks.translate.models import build_model
    from attnkit.tasks.translate.train import collate, masked_loss

    torch.manual_seed(0)
    model = build_model({"kind": kind, "src_vocab": 11, "tgt_vocab": 13, "embed_dim": 8, "hidden": 16,
                         "num_layers": 1, "dropout": 0.0, "num_heads": 2, "ff_dim": 32, "max_len": 64}).eval()
    batch = [([4, 5, 6, 7], [4, 5]), ([8, 9], [6, 7, 8, 9, 10]), ([3], [3])]  # ragged: padding on both sides
    src, src_lens, tgt_in, tgt_out = collate(batch, bos=1, eos=2)
    logits, _ = model(src, src_lens, tgt_in)
    for smoothing in (0.0, 0.1):
        want, n_want = masked_loss(logits, tgt_out, smoothing)
        got, n = model.loss(src, src_lens, tgt_in, tgt_out, label_smoothing=smoothing)
        assert n == n_want == 2 + 1 + 5 + 1 + 1 + 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_token_budget_cuts_batches_to_fit_and_changes_nothing_by_default():
    g = torch.Generator().manual_seed(0)
    costs = [(int(a), int(b)) for a, b in torch.randint(1, 30, (400, 2), generator=g)]
    costs[7] = (200, 180)  # one long pair
    lengths = [s + t for s, t in costs]
    plain = epoch_batches(lengths, 32, seed=1, epoch=2)
    assert epoch_batches(lengths, 32, seed=1, epoch=2, max_tokens=32 * 401, costs=costs) == plain
    cut = epoch_batches(lengths, 32, seed=1, epoch=2, max_tokens=600, costs=costs)
    assert sorted(i for b in cut for i in b) == list(range(400))
    for b in cut:
        assert len(b) == 1 or len(b) * (max(costs[i][0] for i in b) + max(costs[i][1] for i in b) + 1) <= 600
    assert [7] in cut and len(cut) > len(plain)
    assert cut == epoch_batches(lengths, 32, seed=1, epoch=2, max_tokens=600, costs=costs)  # resume is exact


def test_length_limit_is_sized_for_the_data_and_skips_only_outliers():
    from attnkit.tasks.translate.data import Pair
    from attnkit.tasks.translate.train import skip_long, train_length_limit

    pairs = [Pair(["w"] * (i % 12 + 1), ["v"] * (i % 9 + 1)) for i in range(500)]
    pairs.append(Pair(["w"] * 3000, ["v"] * 3000))
    limit = train_length_limit(TrainConfig(), pairs)
    assert limit == 64
    kept, skipped = skip_long(pairs, limit)
    assert skipped == 1 and len(kept) == 500
    assert train_length_limit(TrainConfig(max_train_len=5), pairs) == 5


def test_a_huge_training_pair_is_skipped_with_a_count(tmp_path, capsys):
    """One pair of 3,000 tokens per side grew training to 1.29 GB (500,000 words: 23.7 GB before it was killed);
    now it is skipped, the count is printed, and training goes on."""
    from attnkit.cli import main

    data = tmp_path / "pairs.tsv"
    lines = [f"w{i} go home .\tv{i} rentre .\n" for i in range(60)]
    lines.insert(5, " ".join(["long"] * 3000) + "\t" + " ".join(["long"] * 3000) + "\n")
    data.write_text("".join(lines), encoding="utf-8")
    assert main(["translate", "train", "--data", str(data), "--out", str(tmp_path / "r"), "--hidden", "8",
                 "--embed-dim", "4", "--epochs", "1", "--min-freq", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 training and 0 validation pairs longer than 64 tokens on a side (--max-train-len)" in out
