"""Checkpoints: exact round trip, atomic writes, and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.tasks.translate import checkpoint as ckpt
from attnkit.tasks.translate.errors import TranslateError
from attnkit.tasks.translate.models import build_model

CFG = dict(kind="bahdanau", src_vocab=9, tgt_vocab=7, embed_dim=4, hidden=6, num_layers=1, dropout=0.1)


def trained(tmp_path):
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    src, lens, tgt = torch.randint(4, 9, (2, 3)), torch.tensor([3, 2]), torch.randint(4, 7, (2, 4))
    logits, _ = model(src, lens, tgt)
    logits.sum().backward()
    opt.step()
    meta = {"model": CFG, "src_vocab": [f"s{i}" for i in range(5)], "tgt_vocab": [f"t{i}" for i in range(3)],
            "train": {}, "progress": {"epoch": 1}}
    ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, meta=meta)
    return model, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = trained(tmp_path)
    rng = torch.get_rng_state()
    meta, tensors = ckpt.load_checkpoint(tmp_path)
    assert meta["progress"] == {"epoch": 1}
    fresh = build_model(CFG)
    ckpt.load_model_weights(fresh, tensors, "x")
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt.optimizer_state(tensors, meta))
    for pid, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt2.state_dict()["state"][pid][name]))
    assert torch.equal(tensors["rng.torch"], rng)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "weights.safetensors"]  # no temp
    m, _, src_vocab, tgt_vocab = ckpt.load_trained(tmp_path)
    assert not m.training and len(src_vocab) == 9 and len(tgt_vocab) == 7


def test_missing_files(tmp_path):
    with pytest.raises(TranslateError, match="checkpoint.json: checkpoint file not found"):
        ckpt.load_checkpoint(tmp_path)


def test_corrupt_json_names_the_line(tmp_path):
    trained(tmp_path)
    (tmp_path / "checkpoint.json").write_text('{\n "format": "attnkit-translate/1",\n oops\n}')
    with pytest.raises(TranslateError, match=r"checkpoint.json:3: corrupt checkpoint metadata"):
        ckpt.load_checkpoint(tmp_path)


def test_other_json_is_not_a_checkpoint(tmp_path):
    trained(tmp_path)
    (tmp_path / "checkpoint.json").write_text('{"format": "something-else"}')
    with pytest.raises(TranslateError, match="not an attnkit translate checkpoint"):
        ckpt.load_checkpoint(tmp_path)


def test_damaged_or_swapped_weights_are_detected(tmp_path):
    trained(tmp_path)
    w = tmp_path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(TranslateError, match="checksum differs"):
        ckpt.load_checkpoint(tmp_path)


def test_truncated_weights_with_matching_checksum(tmp_path):
    trained(tmp_path)
    w = tmp_path / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:40])
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    import hashlib

    meta["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(TranslateError, match="corrupt safetensors file"):
        ckpt.load_checkpoint(tmp_path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    trained(tmp_path)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta["model"]["hidden"] = 8
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(TranslateError, match=r"weights do not match the model in the config \(shape"):
        ckpt.load_trained(tmp_path)
    meta["model"]["hidden"] = 6
    meta["src_vocab"] = ["only", "three", "words"]
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(TranslateError, match="vocabulary sizes"):
        ckpt.load_trained(tmp_path)
