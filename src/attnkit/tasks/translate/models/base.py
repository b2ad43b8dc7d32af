"""The shared interface of the translators and the factory that builds one from a JSON-able config."""

from __future__ import annotations

import torch
from torch import nn

MODEL_KINDS = ("bahdanau", "luong", "transformer")


class Seq2Seq(nn.Module):
    """Base class: subclasses implement ``encode``, ``step`` and ``forward`` (see the package docstring)."""

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def step(self, y_prev: torch.Tensor, state: tuple[torch.Tensor, ...]):
        raise NotImplementedError

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor, *,
                need_weights: bool = True) -> tuple[torch.Tensor, dict]:
        """Teacher-forced logits ``(B, T, V)`` and the attention dict (``weights (B, T, S)`` when asked).

        ``need_weights=False`` lets a model skip work done only for the picture (training does this); the
        GRU models get their weights for free and return them either way.
        """
        raise NotImplementedError

    @staticmethod
    def reorder_state(state: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pick batch rows ``index`` of every tensor in ``state`` (beam search)."""
        return tuple(s.index_select(0, index) for s in state)

    def loss(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor, *,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the real (non-padding, id 0) target tokens, and their number."""
        logits, _ = self(src, src_lens, tgt_in, need_weights=False)  # (B, T, V)
        return token_loss(logits.flatten(0, 1), tgt_out.flatten(), label_smoothing)


def token_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of ``logits (N, V)`` against ``target (N,)``, padding (id 0) ignored; and the count."""
    loss = nn.functional.cross_entropy(logits, target, ignore_index=0, reduction="sum",
                                       label_smoothing=label_smoothing)
    return loss, int((target != 0).sum())


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_memory(config: dict, *, copies: int = 1, limit: int | None = None) -> int:
    """Bytes the model of ``config`` needs (``copies`` float32 copies of its tensors: 1 to use it, 4 to train
    it with Adam: weights, gradients, two moments); raise ValueError when that exceeds ``limit`` (default: the
    machine's RAM). The count comes from building the model on the ``meta`` device, which allocates nothing."""
    with torch.device("meta"):
        model = _build(config)
    numel = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    need = 4 * copies * numel
    limit = physical_memory() if limit is None else limit
    if limit is not None and need > limit:
        sizes = {k: config.get(k) for k in ("src_vocab", "tgt_vocab", "embed_dim", "hidden", "ff_dim",
                                             "num_layers", "max_len") if k in config}
        raise ValueError(f"the model config {sizes} needs about {need / 2**30:,.1f} GiB ({numel:,} numbers x "
                         f"{copies} cop{'y' if copies == 1 else 'ies'} x 4 bytes) but this machine has "
                         f"{limit / 2**30:,.1f} GiB; choose smaller sizes")
    return need


def build_model(config: dict) -> Seq2Seq:
    """Build a model from ``config`` (``kind`` plus sizes, as saved in a checkpoint's JSON).

    Raises:
        ValueError: an unknown kind, a missing or out-of-range size, or a model too large for this machine's
            memory (checked before anything is allocated).
    """
    check_model_memory(config)
    return _build(config)


_INT_KEYS = ("src_vocab", "tgt_vocab", "embed_dim", "hidden", "num_layers", "num_heads", "ff_dim", "max_len")


def _build(config: dict) -> Seq2Seq:
    if not isinstance(config, dict):
        raise TypeError(f"model config must be a JSON object; got {type(config).__name__}")
    kind = config.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    keys = {"src_vocab", "tgt_vocab", "embed_dim", "hidden", "num_layers", "dropout"}
    if kind == "transformer":
        keys |= {"num_heads", "ff_dim", "max_len"}
    if kind == "luong":
        keys |= {"score"}
    missing = sorted(keys - set(config))
    if missing:
        raise ValueError(f"model config for {kind!r} misses {missing}; got keys {sorted(config)}")
    args = {k: config[k] for k in keys}
    for k in _INT_KEYS:
        if k in args and (isinstance(args[k], bool) or not isinstance(args[k], int) or args[k] < 1):
            raise ValueError(f"model config {k} must be an int >= 1; got {args[k]!r}")
    if isinstance(args["dropout"], bool) or not isinstance(args["dropout"], (int, float)) \
            or not 0 <= args["dropout"] < 1:
        raise ValueError(f"model config dropout must be a number in [0, 1); got {args['dropout']!r}")
    if kind == "transformer" and args["hidden"] % args["num_heads"]:
        raise ValueError(f"model config hidden ({args['hidden']}) must be divisible by num_heads "
                         f"({args['num_heads']})")
    if kind != "transformer":
        args["bidirectional"] = bool(config.get("bidirectional", False))
    if kind == "bahdanau":
        from attnkit.tasks.translate.models.bahdanau import BahdanauSeq2Seq

        return BahdanauSeq2Seq(**args)
    if kind == "luong":
        from attnkit.tasks.translate.models.luong import LuongSeq2Seq

        return LuongSeq2Seq(**args)
    from attnkit.tasks.translate.models.transformer import TransformerSeq2Seq

    return TransformerSeq2Seq(**args)
