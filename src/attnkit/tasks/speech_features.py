"""Log-mel features for the speech recipe, in plain torch (STFT + a triangular mel filterbank built here).

Mel scale (HTK): ``mel(f) = 2595 * log10(1 + f / 700)``. Filter ``m`` is a triangle over the STFT bin
frequencies that rises from mel point ``m`` to ``m + 1`` and falls to ``m + 2`` (peak 1, no area
normalization), with ``n_mels + 2`` points spaced evenly in mel between ``f_min`` and ``f_max``.
"""

from __future__ import annotations

import torch


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel of a frequency in Hz."""
    f = torch.as_tensor(f, dtype=torch.float64)
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    m = torch.as_tensor(m, dtype=torch.float64)
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, *, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular mel filterbank.

    Returns:
        fb: float32 weights; row ``m`` is filter ``m`` over the ``n_fft // 2 + 1`` STFT bins.

    Shape:
        fb: ``(n_mels, n_fft // 2 + 1)``

    Raises:
        ValueError: non-positive sizes, or ``0 <= f_min < f_max <= sample_rate / 2`` does not hold.
    """
    if n_mels < 1 or n_fft < 2 or sample_rate < 1:
        raise ValueError(
            f"n_mels, n_fft and sample_rate must be positive (n_fft >= 2); got {n_mels}, {n_fft}, {sample_rate}"
        )
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"need 0 <= f_min < f_max <= sample_rate/2 = {sample_rate / 2}; got f_min={f_min}, f_max={f_max}"
        )
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,)
    points = mel_to_hz(torch.linspace(hz_to_mel(f_min).item(), hz_to_mel(f_max).item(), n_mels + 2,
                                      dtype=torch.float64))  # (n_mels + 2,)
    lower, center, upper = points[:-2, None], points[1:-1, None], points[2:, None]  # (n_mels, 1) each
    rising = (freqs[None, :] - lower) / (center - lower)  # (n_mels, F)
    falling = (upper - freqs[None, :]) / (upper - center)  # (n_mels, F)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)  # (n_mels, F)


def log_mel(
    wave: torch.Tensor,
    sample_rate: int,
    *,
    n_fft: int = 256,
    win_length: int = 200,
    hop_length: int = 40,
    n_mels: int = 40,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Log-mel spectrogram ``log(mel_fb @ |STFT(wave)|^2 + eps)``, Hann window, centred frames.

    Args:
        wave: mono samples (float).
        sample_rate: samples per second.
        n_fft / win_length / hop_length: STFT sizes in samples (defaults at 8 kHz: 32 / 25 / 5 ms).
        n_mels: number of mel bands.

    Returns:
        feats: one row per frame, ``1 + T // hop_length`` frames.

    Shape:
        wave: ``(T,)``; feats: ``(1 + T // hop_length, n_mels)``
    """
    if wave.dim() != 1:
        raise ValueError(f"wave must be 1-D (T,) mono samples; got shape {tuple(wave.shape)}")
    wave = wave.to(torch.float32)
    if wave.shape[0] < n_fft // 2 + 1:  # reflect padding needs at least n_fft // 2 + 1 samples
        wave = torch.nn.functional.pad(wave, (0, n_fft // 2 + 1 - wave.shape[0]))
    window = torch.hann_window(win_length, dtype=torch.float32)
    spec = torch.stft(wave, n_fft, hop_length=hop_length, win_length=win_length, window=window,
                      center=True, return_complex=True)  # (F, frames)
    power = spec.abs().pow(2)  # |X|^2, (F, frames)
    fb = mel_filterbank(n_mels, n_fft, sample_rate)  # (n_mels, F)
    mel = fb @ power  # (n_mels, frames)
    return torch.log(mel + eps).T.contiguous()  # (frames, n_mels)


__all__ = ["hz_to_mel", "mel_to_hz", "mel_filterbank", "log_mel"]
