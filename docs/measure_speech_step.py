"""Interleaved train-step and forward time of the speech model: the recipe's own band attention as it was at
commit bcd018d (before) against the library's ``attention(mask=window & padding)`` (now), same weights, same
random batches of the FSDD test set's shape (32 recordings, 100-230 frames, 40 mels; 2 layers, 4 heads, window 16).

    git show bcd018d:src/attnkit/tasks/speech_model.py > /tmp/old_speech_model.py
    OMP_NUM_THREADS=2 .venv/bin/python docs/measure_speech_step.py 5      # rounds of 10 batches
"""

import importlib.util
import statistics
import sys
import time

import torch

from attnkit.tasks.speech_model import SpeechTransformer

torch.set_num_threads(2)
spec = importlib.util.spec_from_file_location("old_speech_model", "/tmp/old_speech_model.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
g = torch.Generator().manual_seed(0)
B, n_mels = 32, 40
batches = []
for _ in range(10):
    lengths = torch.randint(100, 231, (B,), generator=g)
    lengths[0] = 230
    batches.append((torch.randn(B, 230, n_mels, generator=g), lengths, torch.randint(0, 10, (B,), generator=g)))
torch.manual_seed(0)
before = old.SpeechTransformer(n_mels, embed_dim=64, num_heads=4, num_layers=2, ff_dim=128, dropout=0.0, window=16,
                               impl="blocked")
now = SpeechTransformer(n_mels, embed_dim=64, num_heads=4, num_layers=2, ff_dim=128, dropout=0.0, window=16)
now.load_state_dict(before.state_dict())
with torch.no_grad():
    f, lengths, _ = batches[0]
    print("max |logits before - now|", float((before(f, lengths) - now(f, lengths)).abs().max()))


def step(model, batch):
    f, lengths, y = batch
    torch.nn.functional.cross_entropy(model(f, lengths), y).backward()
    model.zero_grad(set_to_none=True)


def forward(model, batch):
    with torch.no_grad():
        model(batch[0], batch[1])


for kind, fn in (("train step", step), ("forward", forward)):
    for m in (before, now):
        fn(m, batches[0])
    ratios, tb, tn = [], [], []
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        for batch in batches:
            t0 = time.perf_counter()
            fn(before, batch)
            t1 = time.perf_counter()
            fn(now, batch)
            t2 = time.perf_counter()
            tb.append(t1 - t0)
            tn.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
    print(f"{kind}: before {statistics.median(tb) * 1e3:.1f} ms, now {statistics.median(tn) * 1e3:.1f} ms, "
          f"median per-pair ratio now/before {statistics.median(ratios):.3f} over {len(ratios)} pairs")
