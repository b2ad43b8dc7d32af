"""Checkpoint averaging (``average_last``): the evaluated weights are the mean of the weights at the ends of the
last N epochs, kept in the checkpoint beside the training weights, exact across an interruption, and what
``eval``/``predict`` load."""

from __future__ import annotations

import os
import signal

import torch

from attnkit.tasks.translate.checkpoint import averaged_state, load_checkpoint, load_trained
from attnkit.tasks.translate.train import TrainConfig, running_mean, train

CFG = dict(model="transformer", hidden=16, num_heads=2, ff_dim=32, num_layers=1, dropout=0.3, batch_size=64,
           seed=3)
STEPS_PER_EPOCH = 39  # the embedded task's training split in batches of 64


def test_running_mean_is_the_mean():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g, dtype=torch.float64), "n": torch.tensor(i)} for i in range(4)]
    mean = None
    for i, s in enumerate(states, 1):
        mean = running_mean(mean, s, i)
    torch.testing.assert_close(mean["w"], torch.stack([s["w"] for s in states]).mean(0), rtol=1e-12, atol=1e-12)
    assert int(mean["n"]) == 3  # integer buffers are taken from the latest state, not averaged


def test_the_evaluated_weights_are_the_mean_of_the_last_epoch_ends(tmp_path):
    ends = {}

    def at_epoch_end(step):
        if step % STEPS_PER_EPOCH == 0:
            ends[step // STEPS_PER_EPOCH] = {k: v.detach().clone() for k, v in model_ref["model"].state_dict().items()}

    model_ref = {}
    import attnkit.tasks.translate.train as train_module

    build = train_module.build_model

    def spy(cfg):  # keep a handle on the model the loop trains
        model_ref["model"] = build(cfg)
        return model_ref["model"]

    train_module.build_model = spy
    try:
        out = train(TrainConfig(epochs=3, average_last=2, **CFG), tmp_path / "run", progress=False,
                    on_step=at_epoch_end)
    finally:
        train_module.build_model = build
    assert sorted(ends) == [1, 2, 3] and [h.get("averaged_epochs") for h in out["history"]] == [None, 1, 2]
    got = out["model"].state_dict()
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (ends[2][k] + ends[3][k]) / 2, rtol=1e-6, atol=1e-7)
    _, tensors = load_checkpoint(tmp_path / "run")
    saved = averaged_state(tensors)
    assert saved is not None and all(torch.equal(saved[k], got[k]) for k in got)
    # the training weights are kept too (a resume continues from them), and differ from their average
    key = next(k for k, v in got.items() if v.ndim == 2)
    assert not torch.equal(tensors[f"model.{key}"], tensors[f"average.{key}"])
    model, *_ = load_trained(tmp_path / "run")  # eval and predict use the average
    assert all(torch.equal(model.state_dict()[k], got[k]) for k in got)


def test_averaging_resumes_exactly(tmp_path):
    cfg = TrainConfig(epochs=2, average_last=2, **CFG)
    whole = train(cfg, tmp_path / "whole", progress=False)

    def ctrl_c(step):  # after the first averaged epoch end, inside the second epoch
        if step == STEPS_PER_EPOCH + 5:
            os.kill(os.getpid(), signal.SIGINT)

    part = train(cfg, tmp_path / "part", progress=False, on_step=ctrl_c)
    assert part["status"] == "interrupted"
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False)
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
