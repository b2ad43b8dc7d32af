"""Speech recipe: mel filterbank and log-mel against independent float64 computations, the FSDD reader and its
errors, blocked truncated attention against the float64 oracle, and a tiny run on real recordings."""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit.tasks.datasets import fsdd
from attnkit.tasks.speech_features import log_mel, mel_filterbank
from attnkit.tasks.speech_model import SpeechEncoderLayer, SpeechTransformer
from reference import attention_ref, padding_ref, window_ref

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd" / "recordings"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"FSDD not found at {DATA}")


def _mel(f):  # HTK mel, written out
    return 2595.0 * math.log10(1.0 + f / 700.0)


def _hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def test_mel_filterbank_matches_closed_form_triangles():
    n_mels, n_fft, sr = 12, 64, 8000
    fb = mel_filterbank(n_mels, n_fft, sr).double()
    assert fb.shape == (n_mels, n_fft // 2 + 1)
    edges = [_hz(_mel(sr / 2) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    for m in range(n_mels):
        lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            want = (f - lo) / (c - lo) if lo <= f <= c else (hi - f) / (hi - c) if c < f <= hi else 0.0
            assert fb[m, k].item() == pytest.approx(want, abs=1e-6), (m, k)


def test_mel_filterbank_partition_of_unity_between_first_and_last_centre():
    fb = mel_filterbank(40, 512, 16000).double()
    freqs = torch.arange(257) * 16000 / 512
    c_first, c_last = _hz(_mel(8000) * 1 / 41), _hz(_mel(8000) * 40 / 41)
    inside = (freqs >= c_first) & (freqs <= c_last)
    assert inside.sum() > 100
    torch.testing.assert_close(fb[:, inside].sum(0), torch.ones(int(inside.sum()), dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_mel_filterbank_rejects_bad_band():
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(10, 256, 8000, f_max=5000.0)


def test_log_mel_frame_equals_numpy_dft_of_that_frame():
    sr, n_fft, win, hop, n_mels = 8000, 256, 200, 40, 40
    rng = np.random.default_rng(0)
    t = np.arange(3000) / sr
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(3000)).astype(np.float32)
    feats = log_mel(torch.from_numpy(x), sr, n_fft=n_fft, win_length=win, hop_length=hop, n_mels=n_mels)
    assert feats.shape == (1 + 3000 // hop, n_mels)
    # frame 20 is centred on sample 20 * hop; the 200-sample Hann window sits in the middle of the 256 frame
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frame = padded[20 * hop: 20 * hop + n_fft]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann, as torch.hann_window
    window = np.zeros(n_fft)
    window[(n_fft - win) // 2: (n_fft - win) // 2 + win] = hann
    power = np.abs(np.fft.rfft(frame * window)) ** 2
    want = np.log(mel_filterbank(n_mels, n_fft, sr).double().numpy() @ power + 1e-6)
    np.testing.assert_allclose(feats[20].double().numpy(), want, rtol=1e-4, atol=1e-4)


def test_log_mel_of_a_tone_peaks_in_the_band_around_it():
    sr = 8000
    x = torch.sin(2 * math.pi * 1000.0 * torch.arange(4000) / sr)
    feats = log_mel(x, sr, n_mels=40)
    centres = [_hz(_mel(sr / 2) * (m + 1) / 41) for m in range(40)]
    nearest = min(range(40), key=lambda m: abs(centres[m] - 1000.0))
    assert int(feats[len(feats) // 2].argmax()) == nearest


@pytest.mark.parametrize("W", [1, 3, 7])
def test_truncated_layer_attends_through_the_library_mask(gen, W):
    """The layer's truncated attention is attention(mask=window & padding): equal to the oracle on valid rows."""
    layer = SpeechEncoderLayer(16, 2, 32, 0.0, window=W)
    q, k, v = (torch.randn(3, 2, 29, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([29, 11, 1])
    got = layer.attend(q, k, v, lengths)
    mask = window_ref(29, 29, W, W)[None] & padding_ref(lengths, 29, 29)  # (B, L, S)
    want, _ = attention_ref(q, k, v, mask=mask[:, None])
    assert mask.any() and not mask.all()
    for b, n in enumerate(lengths.tolist()):  # valid query rows only: padded rows are discarded by the pooling
        torch.testing.assert_close(got[b, :, :n], want[b, :, :n], atol=1e-12, rtol=0)


def test_window_and_padding_of_long_recordings_run_on_the_sparse_kernel():
    from attnkit import masks
    from attnkit.functional import scores
    from attnkit.kernels import dispatch

    q = torch.zeros(2, 4, 2048, 16)
    mask = masks.window(16, 16) & masks.padding(torch.tensor([2048, 1500]))
    req = dict(score=scores.scaled_dot, score_mod=None, mask=mask, bias=None, normalize="softmax", scale=None,
               dropout_p=0.0, return_weights=False, return_lse=False)
    from attnkit.kernels import _native

    assert dispatch.choose(q, q, q, **req) == ("native" if _native.available() else "blocksparse")


def test_truncated_model_is_local_through_gradients():
    """With 1 layer and window 2, the output at frame 10 depends on input frames 8..12 only."""
    torch.manual_seed(0)
    model = SpeechTransformer(6, embed_dim=16, num_heads=2, num_layers=1, ff_dim=16, dropout=0.0, window=2)
    x = torch.randn(1, 30, 6, requires_grad=True)
    h = model.embed(x)
    y = model.layers[0](h, torch.tensor([30]))
    (g,) = torch.autograd.grad(y[0, 10].sum(), h)
    touched = (g[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == [8, 9, 10, 11, 12]


def test_list_recordings_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        fsdd.list_recordings(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("not audio")
    with pytest.raises(ValueError, match="found none"):
        fsdd.list_recordings(tmp_path)
    (tmp_path / "3_alice_7.wav").write_bytes(b"RIFF garbage")
    (rec,) = fsdd.list_recordings(tmp_path)
    assert (rec.digit, rec.speaker, rec.index, rec.is_test) == (3, "alice", 7, False)
    with pytest.raises(ValueError, match="could not read"):
        fsdd.read_wav(rec.path)


def test_read_wav_roundtrip_and_rate_check(tmp_path):
    samples = (np.sin(np.arange(800) / 5) * 12000).astype("<i2")
    path = tmp_path / "0_bob_0.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(samples.tobytes())
    x, rate = fsdd.read_wav(path)
    assert rate == 8000
    np.testing.assert_allclose(x, samples / 32768.0, atol=1e-7)
    with pytest.raises(ValueError, match="16000"):
        fsdd.read_wav(path, expected_rate=16000)


@needs_data
def test_official_split_on_real_data():
    recs = fsdd.list_recordings(DATA)
    train, test = fsdd.split(recs)
    assert (len(recs), len(train), len(test)) == (3000, 2700, 300)
    assert {r.index for r in test} == set(range(5))
    assert {(r.digit, r.speaker) for r in test} == {(r.digit, r.speaker) for r in train}


@needs_data
def test_tiny_run_on_real_recordings(tmp_path, capsys):
    from attnkit.cli import main

    rc = main(["speech", "--data", str(DATA), "--out", str(tmp_path), "--quick", "--limit", "20"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["results"]) == {"truncated", "full"}
    for r in metrics["results"].values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["forward_ms_per_batch"] > 0
        assert r["forward_peak_mib_per_batch_mean"] > 0
    assert (tmp_path / "speech.png").stat().st_size > 0 and (tmp_path / "window_mask.png").exists()
    assert list(tmp_path.glob("features-*.npz"))
    # the saved weights (safetensors) score the same when measured again without training
    rc = main(["speech", "--data", str(DATA), "--out", str(tmp_path), "--quick", "--limit", "20", "--measure-only"])
    again = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert rc == 0 and not again["full"]["trained_in_this_run"]
    for name in ("truncated", "full"):
        assert again[name]["test_accuracy"] == metrics["results"][name]["test_accuracy"]


def test_cli_reports_missing_data(tmp_path, capsys):
    from attnkit.cli import main

    rc = main(["speech", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--quick"])
    assert rc == 2
    assert "FSDD" in capsys.readouterr().err
