"""FSDD log-mel features for the speech recipe: compute once, cache in the run directory (npz, no pickle), batch."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attnkit.tasks.datasets import fsdd
from attnkit.tasks.speech_features import log_mel


@dataclass(frozen=True)
class FeatureConfig:
    """STFT / mel sizes (samples at 8 kHz: n_fft 256 = 32 ms, win 200 = 25 ms, hop 40 = 5 ms)."""

    sample_rate: int = 8000
    n_fft: int = 256
    win_length: int = 200
    hop_length: int = 40
    n_mels: int = 40


@dataclass
class FeatureSet:
    """Variable-length feature sequences with labels.

    Shape:
        feats[i]: ``(L_i, n_mels)``; labels: ``(N,)``
    """

    feats: list[torch.Tensor]
    labels: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.feats)


def _write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_features(recordings: list[fsdd.Recording], config: FeatureConfig, cache_dir: Path | None = None,
                  progress=None) -> FeatureSet:
    """Log-mel features of ``recordings`` (cached as ``cache_dir/features-<hash>.npz`` when given).

    ``progress``: optional wrapper for the file iterator (a tqdm factory), used only when computing.
    """
    names = [r.path.name for r in recordings]
    key = hashlib.sha256(json.dumps([asdict(config), names]).encode()).hexdigest()[:16]
    cache = None if cache_dir is None else Path(cache_dir) / f"features-{key}.npz"
    labels = torch.tensor([r.digit for r in recordings], dtype=torch.long)
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            flat, offsets = torch.from_numpy(z["flat"]), z["offsets"]
        feats = [flat[offsets[i]:offsets[i + 1]] for i in range(len(names))]
        return FeatureSet(feats, labels, names)
    items = recordings if progress is None else progress(recordings)
    feats = []
    for rec in items:
        wave, _ = fsdd.read_wav(rec.path, expected_rate=config.sample_rate)
        feats.append(log_mel(torch.from_numpy(wave), config.sample_rate, n_fft=config.n_fft,
                             win_length=config.win_length, hop_length=config.hop_length,
                             n_mels=config.n_mels))  # (L_i, n_mels)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [f.shape[0] for f in feats])
        _write_npz_atomic(cache, flat=torch.cat(feats).numpy(), offsets=offsets)
    return FeatureSet(feats, labels, names)


def normalizer(train: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band mean and std over all training frames. Shape: ``(n_mels,)`` each."""
    flat = torch.cat(train.feats)  # (sum L_i, n_mels)
    return flat.mean(0), flat.std(0).clamp(min=1e-5)


def collate(feats: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize and zero-pad to the longest sequence.

    Shape:
        returns padded ``(B, L_max, n_mels)`` and lengths ``(B,)``.
    """
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    padded = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])  # (B, L_max, n_mels)
    for i, f in enumerate(feats):
        padded[i, : f.shape[0]] = (f - mean) / std
    return padded, lengths


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches: shuffled with ``generator``, in order when it is ``None``."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def bucket_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches of similar length (little padding): sort by length plus noise, cut, shuffle the batches."""
    noisy = torch.tensor(lengths, dtype=torch.float64) * (1 + 0.1 * torch.rand(len(lengths), generator=generator,
                                                                                  dtype=torch.float64))
    chunks = list(noisy.argsort().split(batch_size))
    return [chunks[i] for i in torch.randperm(len(chunks), generator=generator)]


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator, *, time_width: int = 20,
                 freq_width: int = 6) -> torch.Tensor:
    """Zero one random band of mel channels and one random span of frames per example (SpecAugment-style).

    Shape:
        x: ``(B, L, n_mels)`` -> same
    """
    x = x.clone()
    B, _, M = x.shape
    for i in range(B):
        f = int(torch.randint(0, freq_width + 1, (1,), generator=generator))
        f0 = int(torch.randint(0, M - f + 1, (1,), generator=generator))
        x[i, :, f0:f0 + f] = 0.0
        n = int(lengths[i])
        t = min(int(torch.randint(0, time_width + 1, (1,), generator=generator)), n // 4)
        t0 = int(torch.randint(0, n - t + 1, (1,), generator=generator))
        x[i, t0:t0 + t] = 0.0
    return x
