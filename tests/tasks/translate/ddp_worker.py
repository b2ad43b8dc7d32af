"""One rank of `attnkit translate train` under torchrun's environment (started by test_translate_ddp.py).

Runs the real command line; records, per optimizer step, this rank's summed token loss and token count (by
wrapping the model's ``loss``), and writes them with its pid to ``<record>.<rank>.json``."""

from __future__ import annotations

import json
import os
import sys

from attnkit.tasks.translate import train as train_module

record, argv = sys.argv[1], sys.argv[2:]
steps: list[tuple[float, int]] = []
build = train_module.build_model


def recording_build(config):
    model = build(config)
    loss = model.loss

    def recorded(*args, **kwargs):
        out = loss(*args, **kwargs)
        if model.training:
            steps.append((float(out[0].detach()), int(out[1])))
        return out

    model.loss = recorded
    return model


train_module.build_model = recording_build
from attnkit.cli import main  # noqa: E402

rc = main(argv)
with open(f"{record}.{os.environ['RANK']}.json", "w") as f:
    json.dump({"rc": rc, "pid": os.getpid(), "steps": steps}, f)
sys.exit(rc)
