"""Free Spoken Digit Dataset (FSDD): list, split and read its recordings.

The set is 3,000 mono 8 kHz 16-bit WAV files named ``{digit}_{speaker}_{index}.wav`` (6 speakers x 10 digits x
50 takes). The official split puts takes 0-4 of every speaker and digit in the test set (300 files) and takes
5-49 in the training set (2,700 files).

Source: https://github.com/Jakobovski/free-spoken-digit-dataset (CC BY-SA 4.0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
TEST_INDICES = range(0, 5)  # official split: takes 0-4 of each speaker/digit are test


@dataclass(frozen=True)
class Recording:
    """One FSDD file: its path and the label parts of its name."""

    path: Path
    digit: int
    speaker: str
    index: int

    @property
    def is_test(self) -> bool:
        return self.index in TEST_INDICES


def list_recordings(root: str | Path) -> list[Recording]:
    """All recordings under ``root`` (the ``recordings`` folder, or the folder that holds it), sorted by name.

    Raises:
        ValueError: ``root`` does not exist, is not a folder, or holds no ``{digit}_{speaker}_{index}.wav`` file.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(
            f"data must be the FSDD 'recordings' folder with files like 0_george_0.wav; got {str(root)!r}, "
            "which does not exist. Point --data at free-spoken-digit-dataset/recordings."
        )
    if not root.is_dir():
        raise ValueError(f"data must be a folder of FSDD .wav files; got the file {str(root)!r}")
    if not any(root.glob("*.wav")) and (root / "recordings").is_dir():
        root = root / "recordings"
    out = []
    for path in sorted(root.glob("*.wav")):
        m = _NAME.match(path.name)
        if m:
            out.append(Recording(path, int(m.group(1)), m.group(2), int(m.group(3))))
    if not out:
        raise ValueError(
            f"data must hold FSDD recordings named {{digit}}_{{speaker}}_{{index}}.wav (e.g. 0_george_0.wav); "
            f"found none in {str(root)!r}. Point --data at free-spoken-digit-dataset/recordings."
        )
    return out


def split(recordings: list[Recording]) -> tuple[list[Recording], list[Recording]]:
    """(train, test) by the official rule: take index 0-4 is test."""
    train = [r for r in recordings if not r.is_test]
    test = [r for r in recordings if r.is_test]
    return train, test


def read_wav(path: str | Path, *, expected_rate: int | None = 8000) -> tuple[np.ndarray, int]:
    """Read a mono WAV file as float32 samples in [-1, 1] and its sample rate.

    Uses ``soundfile``; a multi-channel file is averaged to mono.

    Raises:
        ValueError: the file cannot be decoded, is empty, or its rate differs from ``expected_rate``.
    """
    import soundfile as sf

    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own LibsndfileError / RuntimeError types
        raise ValueError(f"could not read {str(path)!r} as a WAV file ({exc}); expected 8 kHz mono PCM") from exc
    if samples.shape[0] == 0:
        raise ValueError(f"recording {str(path)!r} holds no samples; expected a non-empty WAV file")
    if expected_rate is not None and rate != expected_rate:
        raise ValueError(f"recording {str(path)!r} has sample rate {rate} Hz; expected {expected_rate} Hz")
    return samples.mean(axis=1).astype(np.float32), int(rate)
