"""Checkpoints without pickle, saved as one unit: a new snapshot folder, switched in by one atomic rename.

A run directory holds::

    checkpoint.json                      the manifest: which snapshot is current, and the SHA-256 of its files
    checkpoints/<step>-<random>/         one snapshot, never changed once written
        meta.json                        config, vocabularies, progress, history, optimizer hyper-parameters
        weights.safetensors              model, optimizer and RNG tensors
    run.lock                             held by the trainer (see ``runlock``)

A save writes the snapshot under a ``.partial`` name, fsyncs its files and the folder, renames it to its final
name, then replaces the manifest atomically (``_io.write_text_atomic``: temporary file, fsync, ``os.replace``,
fsync of the run directory). Whatever stops a save (``kill -9``, a second Ctrl-C, a full disk), the manifest
names either the previous snapshot or the new one, and both are complete. Readers read the manifest once and
then only the files it names, checking both checksums, so they never mix two checkpoints; every file that
changes a translation (weights, vocabularies, config) is covered. The snapshot the manifest named before the
switch is kept (a reader may still be reading it); older ones and ``.partial`` leftovers are deleted by the
next save, which only a trainer holding the run lock makes.

Checkpoints of the first format (``attnkit-translate/1``: ``checkpoint.json`` and ``weights.safetensors`` side
by side, only the weights checksummed) still load; the next save of such a run writes the current format.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from attnkit._io import fsync_dir, write_file, write_text_atomic
from attnkit.tasks.translate.errors import TranslateError

FORMAT = "attnkit-translate/2"  # the manifest
LEGACY_FORMAT = "attnkit-translate/1"  # checkpoint.json + weights.safetensors in the run directory
MANIFEST, SNAPSHOTS = "checkpoint.json", "checkpoints"
WEIGHTS, META = "weights.safetensors", "meta.json"
_NAME = re.compile(r"^[0-9]{9,}-[0-9a-f]{8}$")
SECTIONS = ("train", "model", "src_vocab", "tgt_vocab", "history", "status", "progress", "optimizer")


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().clone().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(run_dir: Path) -> tuple[bytes, dict] | None:
    try:
        raw = (run_dir / MANIFEST).read_bytes()
    except FileNotFoundError:
        return None
    return raw, _parse_json(raw, run_dir / MANIFEST, "checkpoint manifest")


def _parse_json(raw: bytes, path: Path, what: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise TranslateError(f"{path}:{exc.lineno}: corrupt {what} ({exc.msg})") from None
    except UnicodeDecodeError:
        raise TranslateError(f"{path}: corrupt {what} (not UTF-8 text)") from None


def current_snapshot(run_dir: str | Path) -> Path | None:
    """The snapshot folder the manifest names (None for no manifest or a first-format checkpoint)."""
    found = _read_manifest(Path(run_dir))
    if found is None or not isinstance(found[1], dict) or found[1].get("format") != FORMAT:
        return None
    return Path(run_dir) / found[1]["snapshot"]


def save_checkpoint(run_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict, average: dict[str, torch.Tensor] | None = None) -> Path:
    """Save model weights, optimizer state, the torch RNG state and ``meta`` (JSON-able) as a new snapshot and
    make it current in one atomic step; return the snapshot folder. The caller must hold the run lock.

    On any failure (an ``OSError`` such as a full disk, ``KeyboardInterrupt``) the manifest still names the
    previous snapshot and the half-written one is removed.
    """
    from safetensors.torch import save

    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if average:  # the running mean of the weights at the ends of the last epochs (``TrainConfig.average_last``)
        tensors.update({f"average.{k}": v.detach().clone().contiguous() for k, v in average.items()})
    blob = save(tensors, metadata={"format": FORMAT})
    meta_bytes = (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    snapshots = run_dir / SNAPSHOTS
    snapshots.mkdir(parents=True, exist_ok=True)
    step = int(meta.get("progress", {}).get("global_step", 0))
    name = f"{step:09d}-{secrets.token_hex(4)}"
    partial, final = snapshots / f"{name}.partial", snapshots / name
    previous = _current_or_none(run_dir)
    try:
        os.mkdir(partial, 0o777)  # less the umask
        write_file(partial / WEIGHTS, blob)
        write_file(partial / META, meta_bytes)
        fsync_dir(partial)
        os.rename(partial, final)
        fsync_dir(snapshots)
        manifest = {"format": FORMAT, "snapshot": f"{SNAPSHOTS}/{name}",
                    "files": {META: _sha256(meta_bytes), WEIGHTS: _sha256(blob)},
                    "previous": previous.name if previous is not None else None,
                    "status": meta.get("status"), "global_step": step}
        write_text_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # the switch
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if _current_or_none(run_dir) != final:
            shutil.rmtree(final, ignore_errors=True)
        raise
    collect_garbage(run_dir)
    return final


def _current_or_none(run_dir: Path) -> Path | None:
    try:
        return current_snapshot(run_dir)
    except (TranslateError, OSError, KeyError, TypeError):
        return None


def collect_garbage(run_dir: str | Path) -> list[Path]:
    """Delete the snapshots the manifest does not name as current or previous, ``.partial`` leftovers of
    interrupted saves and the weights of a first-format checkpoint; return what was deleted. Call it only
    while holding the run lock (a trainer writing a snapshot must not lose it)."""
    run_dir = Path(run_dir)
    found = _read_manifest(run_dir)
    if found is None or not isinstance(found[1], dict) or found[1].get("format") != FORMAT:
        return []
    keep = {Path(str(found[1].get("snapshot"))).name, found[1].get("previous")}
    removed = []
    folder = run_dir / SNAPSHOTS
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        base = entry.name[: -len(".partial")] if entry.name.endswith(".partial") else entry.name
        if entry.name in keep or not _NAME.match(base):
            continue  # not ours: leave it
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    legacy = run_dir / WEIGHTS
    if legacy.is_file():
        legacy.unlink()
        removed.append(legacy)
    if removed:
        fsync_dir(folder if folder.is_dir() else run_dir)
    return removed


def remove_checkpoint(run_dir: str | Path) -> None:
    """Forget the run's checkpoint (``--overwrite``): the manifest goes first (one atomic unlink), then the
    snapshots. The caller must hold the run lock."""
    run_dir = Path(run_dir)
    for name in (MANIFEST, WEIGHTS):
        (run_dir / name).unlink(missing_ok=True)
    if run_dir.is_dir():
        fsync_dir(run_dir)
    shutil.rmtree(run_dir / SNAPSHOTS, ignore_errors=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / MANIFEST).is_file()


def load_checkpoint(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the current checkpoint; return ``(meta, tensors)``. Model/optimizer/RNG tensors are under
    ``model.``, ``optim.`` and ``rng.``; use ``model_state`` / ``optimizer_state`` to take them apart.

    A snapshot deleted while it is being read (a trainer switched twice meanwhile) is retried with the new
    manifest.

    Raises:
        TranslateError: missing, corrupt or mismatched files, naming the file and what was wrong.
    """
    run_dir = Path(run_dir)
    for _attempt in range(20):
        found = _read_manifest(run_dir)
        if found is None:
            raise TranslateError(f"{run_dir / MANIFEST}: checkpoint file not found (train a model with "
                                 f"`attnkit translate train --out {run_dir}` first)")
        raw, manifest = found
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        if fmt == LEGACY_FORMAT:
            try:
                return _load_legacy(run_dir, raw, manifest)
            except FileNotFoundError:
                continue  # a trainer converted the run to the current format meanwhile
        if fmt != FORMAT:
            raise TranslateError(f"{run_dir / MANIFEST}: not an attnkit translate checkpoint (format {fmt!r}, "
                                 f"expected {FORMAT!r} or the older {LEGACY_FORMAT!r})")
        snapshot, files = _check_manifest(run_dir, manifest)
        try:
            meta_bytes = (snapshot / META).read_bytes()
            blob = (snapshot / WEIGHTS).read_bytes()
        except FileNotFoundError as exc:
            again = _read_manifest(run_dir)
            if again is not None and again[0] != raw:
                continue  # switched while we read: read the new one
            raise TranslateError(f"{exc.filename}: checkpoint file not found (named by {run_dir / MANIFEST}); "
                                 "the run directory is damaged") from None
        for path, data in ((snapshot / META, meta_bytes), (snapshot / WEIGHTS, blob)):
            if _sha256(data) != files[path.name]:
                raise TranslateError(f"{path}: does not match {run_dir / MANIFEST} (checksum differs): the file "
                                     "was edited or is corrupt; checkpoints cannot be edited by hand")
        meta = _parse_json(meta_bytes, snapshot / META, "checkpoint metadata")
        check_meta(meta, snapshot / META)
        return meta, _load_tensors(blob, snapshot / WEIGHTS)
    raise TranslateError(f"{run_dir}: the checkpoint changed 20 times while being read; try again")


def _check_manifest(run_dir: Path, manifest: dict) -> tuple[Path, dict]:
    where = run_dir / MANIFEST
    snap, files = manifest.get("snapshot"), manifest.get("files")
    if not isinstance(snap, str) or not re.fullmatch(f"{SNAPSHOTS}/[0-9]{{9,}}-[0-9a-f]{{8}}", snap):
        raise TranslateError(f"{where}: field 'snapshot' must name a folder {SNAPSHOTS}/<step>-<id>; got {snap!r}")
    if not isinstance(files, dict) or not all(isinstance(files.get(k), str) for k in (META, WEIGHTS)):
        raise TranslateError(f"{where}: field 'files' must give the SHA-256 of {META} and {WEIGHTS}; got {files!r}")
    return run_dir / snap, files


def _load_tensors(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(blob)
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise TranslateError(f"{path}: corrupt safetensors file ({exc})") from None


def _load_legacy(run_dir: Path, raw: bytes, meta: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A first-format checkpoint: ``checkpoint.json`` (config and the weights' checksum) + ``weights.safetensors``."""
    meta_path, weights_path = run_dir / MANIFEST, run_dir / WEIGHTS
    if not isinstance(meta.get("weights_sha256"), str):
        raise TranslateError(f"{meta_path}: corrupt checkpoint metadata (no 'weights_sha256' entry)")
    try:
        blob = weights_path.read_bytes()
    except FileNotFoundError:
        if (run_dir / MANIFEST).read_bytes() != raw:
            raise
        raise TranslateError(f"{weights_path}: checkpoint file not found (named by {meta_path})") from None
    if _sha256(blob) != meta["weights_sha256"]:
        raise TranslateError(f"{weights_path}: does not match {meta_path.name} (checksum differs): the weights "
                             "are corrupt or come from another run")
    meta = {k: v for k, v in meta.items() if k not in ("format", "weights_sha256")}
    check_meta(meta, meta_path)
    return meta, _load_tensors(blob, weights_path)


def check_meta(meta: object, path: Path) -> None:
    """Refuse metadata whose sections are missing, unknown or of the wrong type, naming the field."""
    if not isinstance(meta, dict):
        raise TranslateError(f"{path}: corrupt checkpoint metadata (expected a JSON object, got "
                             f"{type(meta).__name__})")
    for key in ("train", "model", "src_vocab", "tgt_vocab"):
        if key not in meta:
            raise TranslateError(f"{path}: corrupt checkpoint metadata (no {key!r} entry)")
    unknown = sorted(set(meta) - set(SECTIONS))
    if unknown:
        raise TranslateError(f"{path}: unknown checkpoint field(s) {unknown}; expected some of {list(SECTIONS)}")
    types = {"train": dict, "model": dict, "history": list, "progress": dict, "optimizer": dict}
    for key, typ in types.items():
        if key in meta and not isinstance(meta[key], typ):
            raise TranslateError(f"{path}: field {key!r} must be a JSON {'object' if typ is dict else 'list'}; "
                                 f"got {type(meta[key]).__name__}")
    for key in ("src_vocab", "tgt_vocab"):  # a list of words, or a subword vocabulary's JSON object
        if not isinstance(meta[key], (list, dict)):
            raise TranslateError(f"{path}: field {key!r} must be a JSON list of words or a subword vocabulary "
                                 f"object; got {type(meta[key]).__name__}")
        bad = next((t for t in meta[key] if not isinstance(t, str)), None) if isinstance(meta[key], list) else None
        if bad is not None:
            raise TranslateError(f"{path}: field {key!r} must list strings; got {bad!r}")
    if "progress" in meta:
        prog = meta["progress"]
        for key in ("epoch", "step", "global_step"):
            if key not in prog:
                continue  # needed only to resume; train says so if it is missing
            value = prog[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TranslateError(f"{path}: field progress.{key} must be an int >= 0; got {value!r}")
    from attnkit.tasks.translate.config import TrainConfig

    try:
        TrainConfig.from_dict(meta["train"])
    except (ValueError, TypeError) as exc:
        raise TranslateError(f"{path}: bad field 'train' ({exc})") from None


def model_state(tensors: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def averaged_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The averaged weights of the checkpoint (``average.`` tensors), or None when it holds none."""
    return model_state(tensors, "average.") or None


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict | None:
    if "optimizer" not in meta:
        return None
    return _unflatten_optimizer(tensors, meta["optimizer"])


def load_model_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path, *,
                       prefix: str = "model.") -> None:
    """Load the ``prefix`` tensors (the trained weights, or ``average.``: their average) into ``model``
    strictly; a mismatch becomes a one-line TranslateError."""
    state = model_state(tensors, prefix)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape (file vs model) {shapes[:2]}" if shapes else "",
        ]))
        raise TranslateError(f"{source}: weights do not match the model in the config ({detail})")
    model.load_state_dict(state)


def load_trained(run_dir: str | Path):
    """Rebuild the trained model of ``run_dir`` for use: ``(model in eval mode, meta, src_vocab, tgt_vocab)``.

    Raises:
        TranslateError: missing/corrupt/mismatched checkpoint files or a config that builds no model (or one
            too large for this machine's memory, refused before anything is allocated).
    """
    from attnkit.tasks.translate import vocabulary
    from attnkit.tasks.translate.models import build_model

    run_dir = Path(run_dir)
    meta, tensors = load_checkpoint(run_dir)
    try:
        src_vocab, tgt_vocab = vocabulary.from_meta(meta["src_vocab"]), vocabulary.from_meta(meta["tgt_vocab"])
        model_cfg = dict(meta["model"])
        if (model_cfg.get("src_vocab"), model_cfg.get("tgt_vocab")) != (len(src_vocab), len(tgt_vocab)):
            raise ValueError(f"vocabulary sizes {len(src_vocab)}/{len(tgt_vocab)} differ from the model's "
                             f"{model_cfg.get('src_vocab')}/{model_cfg.get('tgt_vocab')}")
        model = build_model(model_cfg)
    except (ValueError, TypeError) as exc:
        raise TranslateError(f"{run_dir / MANIFEST}: bad model config or vocabulary ({exc})") from None
    # a run that averaged its last epochs' weights is used with the average (what its final scores measured)
    prefix = "average." if averaged_state(tensors) is not None else "model."
    load_model_weights(model, tensors, run_dir / MANIFEST, prefix=prefix)
    model.eval()
    return model, meta, src_vocab, tgt_vocab
