"""Checkpoints: exact round trip, one unit (manifest + snapshot), every file checksummed, clear errors for
corrupt, edited or mismatched files, the first format still loads, old snapshots are collected."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch

from attnkit.tasks.translate import checkpoint as ckpt
from attnkit.tasks.translate.errors import TranslateError
from attnkit.tasks.translate.models import build_model

CFG = dict(kind="bahdanau", src_vocab=9, tgt_vocab=7, embed_dim=4, hidden=6, num_layers=1, dropout=0.1)


def trained(tmp_path, step=0):
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    src, lens, tgt = torch.randint(4, 9, (2, 3)), torch.tensor([3, 2]), torch.randint(4, 7, (2, 4))
    logits, _ = model(src, lens, tgt)
    logits.sum().backward()
    opt.step()
    meta = {"model": CFG, "src_vocab": [f"s{i}" for i in range(5)], "tgt_vocab": [f"t{i}" for i in range(3)],
            "train": {}, "progress": {"epoch": 1, "global_step": step}}
    ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, meta=meta)
    return model, opt


def reseal(run_dir, edit):
    """Edit the current snapshot's meta.json and fix its checksum, as someone determined to edit would."""
    manifest = json.loads((run_dir / "checkpoint.json").read_text())
    path = run_dir / manifest["snapshot"] / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    manifest["files"]["meta.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run_dir / "checkpoint.json").write_text(json.dumps(manifest))


def snapshot(run_dir):
    return run_dir / json.loads((run_dir / "checkpoint.json").read_text())["snapshot"]


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = trained(tmp_path)
    rng = torch.get_rng_state()
    meta, tensors = ckpt.load_checkpoint(tmp_path)
    assert meta["progress"] == {"epoch": 1, "global_step": 0}
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoints"]  # no temp
    assert sorted(p.name for p in snapshot(tmp_path).iterdir()) == ["meta.json", "weights.safetensors"]
    m, _, src_vocab, tgt_vocab = ckpt.load_trained(tmp_path)
    assert not m.training and len(src_vocab) == 9 and len(tgt_vocab) == 7


def test_missing_files(tmp_path):
    with pytest.raises(TranslateError, match="checkpoint.json: checkpoint file not found"):
        ckpt.load_checkpoint(tmp_path)
    trained(tmp_path)
    (snapshot(tmp_path) / "weights.safetensors").unlink()
    with pytest.raises(TranslateError, match="weights.safetensors: checkpoint file not found"):
        ckpt.load_checkpoint(tmp_path)


def test_corrupt_manifest_names_the_line(tmp_path):
    trained(tmp_path)
    (tmp_path / "checkpoint.json").write_text('{\n "format": "attnkit-translate/2",\n oops\n}')
    with pytest.raises(TranslateError, match=r"checkpoint.json:3: corrupt checkpoint manifest"):
        ckpt.load_checkpoint(tmp_path)


def test_other_json_is_not_a_checkpoint(tmp_path):
    trained(tmp_path)
    (tmp_path / "checkpoint.json").write_text('{"format": "something-else"}')
    with pytest.raises(TranslateError, match="not an attnkit translate checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text('{"format": "attnkit-translate/2", "snapshot": "../../etc"}')
    with pytest.raises(TranslateError, match="field 'snapshot' must name a folder"):
        ckpt.load_checkpoint(tmp_path)


def test_damaged_weights_are_detected(tmp_path):
    trained(tmp_path)
    w = snapshot(tmp_path) / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(TranslateError, match=r"weights.safetensors: does not match .* \(checksum differs\)"):
        ckpt.load_checkpoint(tmp_path)


def test_vocabulary_or_config_edits_are_detected(tmp_path):
    trained(tmp_path)
    path = snapshot(tmp_path) / "meta.json"
    meta = json.loads(path.read_text())
    meta["tgt_vocab"][0], meta["tgt_vocab"][1] = meta["tgt_vocab"][1], meta["tgt_vocab"][0]
    path.write_text(json.dumps(meta))
    with pytest.raises(TranslateError, match="meta.json: does not match .* cannot be edited by hand"):
        ckpt.load_trained(tmp_path)


def test_truncated_weights_with_matching_checksum(tmp_path):
    trained(tmp_path)
    w = snapshot(tmp_path) / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:40])
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    manifest["files"]["weights.safetensors"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (tmp_path / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(TranslateError, match="corrupt safetensors file"):
        ckpt.load_checkpoint(tmp_path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    trained(tmp_path)
    reseal(tmp_path, lambda m: m["model"].update(hidden=8))
    with pytest.raises(TranslateError, match=r"weights do not match the model in the config \(shape"):
        ckpt.load_trained(tmp_path)
    reseal(tmp_path, lambda m: m["model"].update(hidden=6) or m.update(src_vocab=["only", "three", "words"]))
    with pytest.raises(TranslateError, match="vocabulary sizes"):
        ckpt.load_trained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["train"].update(max_len=0), r"bad field 'train' \(max_len must be >= 1; got 0"),
    (lambda m: m.pop("model"), r"no 'model' entry"),
    (lambda m: m.update(colour="blue"), r"unknown checkpoint field\(s\) \['colour'\]"),
    (lambda m: m["train"].update(colour="blue"), r"unknown training options \['colour'\]"),
    (lambda m: m.update(src_vocab="abc"), r"field 'src_vocab' must be a JSON list"),
    (lambda m: m["model"].update(hidden=10**6), r"needs about [0-9,.]+ GiB .* choose smaller sizes"),
    (lambda m: m["model"].update(hidden=0), r"model config hidden must be an int >= 1; got 0"),
    (lambda m: m["progress"].update(epoch=-1), r"progress.epoch must be an int >= 0; got -1"),
])
def test_edited_fields_are_refused_by_name(tmp_path, edit, message):
    trained(tmp_path)
    reseal(tmp_path, edit)
    with pytest.raises(TranslateError, match=message):
        ckpt.load_trained(tmp_path)


def test_first_format_checkpoint_loads_and_the_next_save_converts_it(tmp_path):
    from safetensors.torch import save

    model, opt = trained(tmp_path / "new")
    _, tensors = ckpt.load_checkpoint(tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    blob = save(tensors, metadata={"format": "attnkit-translate/1"})
    (old / "weights.safetensors").write_bytes(blob)
    meta = {"model": CFG, "src_vocab": [f"s{i}" for i in range(5)], "tgt_vocab": [f"t{i}" for i in range(3)],
            "train": {}, "format": "attnkit-translate/1", "weights_sha256": hashlib.sha256(blob).hexdigest()}
    (old / "checkpoint.json").write_text(json.dumps(meta))
    m, meta2, _, _ = ckpt.load_trained(old)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values(), strict=True))
    ckpt.save_checkpoint(old, model=m, optimizer=None, meta=meta2)
    assert sorted(p.name for p in old.iterdir()) == ["checkpoint.json", "checkpoints"]
    assert json.loads((old / "checkpoint.json").read_text())["format"] == "attnkit-translate/2"
    ckpt.load_trained(old)


def test_old_snapshots_and_leftovers_are_collected_but_not_foreign_files(tmp_path):
    for step in range(4):
        trained(tmp_path, step=step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("000000002-") and names[1].startswith("000000003-")
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert manifest["previous"] == names[0] and manifest["snapshot"] == f"checkpoints/{names[1]}"
    (tmp_path / "checkpoints" / "000000009-0123abcd.partial").mkdir()  # a save killed half-way
    (tmp_path / "checkpoints" / "mine").mkdir()
    trained(tmp_path, step=4)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == [names[1], sorted(left)[1], "mine"] and left[1].startswith("000000004-")


def test_readers_never_see_a_mix_while_a_trainer_saves(tmp_path):
    """A writer thread saves checkpoints whose vocabulary size and weights both encode the save's number; the
    reader loads continuously and must always get a matching pair (the first format tore ~8 % of reads)."""
    model = build_model(CFG)
    trained(tmp_path)
    stop, errors, reads = threading.Event(), [], [0]
    key = next(iter(model.named_parameters()))[0]

    def write():
        i = 0
        while not stop.is_set() and i < 200:
            i += 1
            with torch.no_grad():
                next(model.parameters()).fill_(float(i))
            meta = {"model": CFG, "src_vocab": [f"s{j}" for j in range(5)], "tgt_vocab": [f"t{j}" for j in range(3)],
                    "train": {}, "progress": {"epoch": i, "global_step": i}}
            ckpt.save_checkpoint(tmp_path, model=model, optimizer=None, meta=meta)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while writer.is_alive():
            meta, tensors = ckpt.load_checkpoint(tmp_path)
            first = ckpt.model_state(tensors)[key]
            if meta["progress"]["epoch"] > 1 and float(first.flatten()[0]) != meta["progress"]["epoch"]:
                errors.append((meta["progress"]["epoch"], float(first.flatten()[0])))
            reads[0] += 1
    finally:
        stop.set()
        writer.join()
    assert not errors and reads[0] > 5
