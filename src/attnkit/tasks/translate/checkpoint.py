"""Checkpoints without pickle: ``weights.safetensors`` (model, optimizer and RNG tensors) + ``checkpoint.json``.

Both files are written atomically (a temporary file in the same folder, then ``os.replace``), tensors first;
the JSON (config, vocabularies, progress, optimizer hyper-parameters) records the SHA-256 of the tensor
file, so a pair of files that do not belong together is detected instead of silently loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from attnkit._io import write_bytes_atomic, write_text_atomic
from attnkit.tasks.translate.errors import TranslateError

FORMAT = "attnkit-translate/1"
WEIGHTS, META = "weights.safetensors", "checkpoint.json"


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


def save_checkpoint(run_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict) -> None:
    """Save model weights, optimizer state and the torch RNG state, then ``meta`` (JSON-able) beside them."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    blob = save(tensors, metadata={"format": FORMAT})
    write_bytes_atomic(run_dir / WEIGHTS, blob)
    meta["format"] = FORMAT
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    write_text_atomic(run_dir / META, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def load_checkpoint(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a checkpoint; return ``(meta, tensors)``. Model/optimizer/RNG tensors are under ``model.``,
    ``optim.`` and ``rng.``; use ``model_state`` / ``optimizer_state`` to take them apart.

    Raises:
        TranslateError: missing, corrupt or mismatched files, naming the file and what was wrong.
    """
    from safetensors.torch import load

    run_dir = Path(run_dir)
    meta_path, weights_path = run_dir / META, run_dir / WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise TranslateError(f"{p}: checkpoint file not found (train a model with "
                                 f"`attnkit translate train --out {run_dir}` first)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TranslateError(f"{meta_path}:{exc.lineno}: corrupt checkpoint metadata ({exc.msg})") from None
    except UnicodeDecodeError:
        raise TranslateError(f"{meta_path}: corrupt checkpoint metadata (not UTF-8 text)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TranslateError(f"{meta_path}: not an attnkit translate checkpoint (format {got!r}, "
                             f"expected {FORMAT!r})")
    for key in ("model", "src_vocab", "tgt_vocab", "weights_sha256"):
        if key not in meta:
            raise TranslateError(f"{meta_path}: corrupt checkpoint metadata (no {key!r} entry)")
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise TranslateError(f"{weights_path}: does not match {meta_path.name} (checksum differs): the weights "
                             "are corrupt or come from another run")
    try:
        tensors = load(blob)
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise TranslateError(f"{weights_path}: corrupt safetensors file ({exc})") from None
    return meta, tensors


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict | None:
    if "optimizer" not in meta:
        return None
    return _unflatten_optimizer(tensors, meta["optimizer"])


def load_model_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load the ``model.`` tensors into ``model`` strictly; a mismatch becomes a one-line TranslateError."""
    state = model_state(tensors)
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
        TranslateError: missing/corrupt/mismatched checkpoint files or a config that builds no model.
    """
    from attnkit.tasks.translate.models import build_model
    from attnkit.tasks.translate.vocab import Vocab

    run_dir = Path(run_dir)
    meta, tensors = load_checkpoint(run_dir)
    try:
        src_vocab, tgt_vocab = Vocab(meta["src_vocab"]), Vocab(meta["tgt_vocab"])
        model_cfg = dict(meta["model"])
        if (model_cfg.get("src_vocab"), model_cfg.get("tgt_vocab")) != (len(src_vocab), len(tgt_vocab)):
            raise ValueError(f"vocabulary sizes {len(src_vocab)}/{len(tgt_vocab)} differ from the model's "
                             f"{model_cfg.get('src_vocab')}/{model_cfg.get('tgt_vocab')}")
        model = build_model(model_cfg)
    except (ValueError, TypeError) as exc:
        raise TranslateError(f"{run_dir / META}: bad model config or vocabulary ({exc})") from None
    load_model_weights(model, tensors, run_dir / WEIGHTS)
    model.eval()
    return model, meta, src_vocab, tgt_vocab
