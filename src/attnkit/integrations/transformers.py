"""attnkit as an attention implementation of Hugging Face transformers (5.x).

Three lines::

    import attnkit.integrations.transformers as ak
    ak.register()
    model.set_attn_implementation("attnkit")   # or from_config(cfg, attn_implementation="attnkit")

``register()`` adds two functions under one name: a *mask* function to transformers' ``AttentionMaskInterface``
and an *attention* function to its ``AttentionInterface``. transformers builds a mask for each layer type by
composing small index functions (``causal_mask_function``, ``sliding_window_overlay(w)``,
``packed_sequence_mask_function(ids)``, a 2-D padding mask, ...); its ``sdpa`` and ``eager`` mask functions
evaluate that composition on every ``(query, key)`` pair into an ``L x S`` tensor. :func:`attnkit_mask` instead
reads the composition back into attnkit's structured masks:

==========================================  ==================================================================
transformers                                attnkit
==========================================  ==================================================================
``causal_mask_function``                    ``masks.causal()``
``sliding_window_causal_mask_function(w)``  ``masks.window(w - 1, 0)`` (``kv > q - w``: ``w`` keys, inclusive)
``sliding_window_bidirectional_...(w)``     ``masks.window(w, w)`` (``|q - kv| <= w``)
``bidirectional_mask_function``             nothing (every pair)
``packed_sequence_mask_function(ids)``      ``masks.documents(ids=ids)`` (the position remap it wraps is a
                                            shift, which causal / window masks do not see)
2-D ``attention_mask`` (padding)            ``masks.padding(n)`` (right padding), ``~masks.padding(n)`` (left),
                                            else the ``(B, 1, 1, S)`` key vector as ``masks.dense``
KV cache offsets                            bottom-right alignment when the queries are the last keys' positions,
                                            else ``mask.offset(q0, k0, L=, S=)``
anything else (a model's own overlay)       ``masks.mask_mod(fn)`` (evaluated tile by tile by attnkit)
==========================================  ==================================================================

The attention function then calls :func:`attnkit.functional.attention` with that mask, so a sliding-window
layer runs on the window kernel and never materializes ``L x S``. It honours the layer's ``scaling``, GQA
(``Hq`` a multiple of ``Hkv``), ``dropout`` (transformers passes 0 at evaluation), ``softcap`` (Gemma 2: a
``tanh`` ``score_mod``) and attention sinks (``s_aux``, GPT-OSS: merged through the log-sum-exp; attnkit's
log-sum-exp carries no gradient, so sinks are refused with a ValueError when a gradient is required) and
returns the weights when ``output_attentions=True`` asks for them. transformers is the ``attnkit[hf]`` extra,
imported only here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from attnkit import functional as _functional
from attnkit import masks as _masks
from attnkit.masks._base import tracing

NAME = "attnkit"

__all__ = ["register", "attnkit_mask", "attnkit_attention_forward", "NAME"]


def register(name: str = NAME, *, backend: str = "auto") -> str:
    """Register attnkit with transformers under ``name`` (mask and attention function); returns ``name``.

    ``backend`` is passed to :func:`attnkit.functional.attention` (``"auto"`` picks from the mask's structure;
    naming a kernel, e.g. ``"window"``, makes an unsupported request a ValueError instead of a fallback).
    Calling it again replaces the earlier registration.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string; got {name!r}.")
    AttentionMaskInterface.register(name, attnkit_mask)
    AttentionInterface.register(name, functools.partial(attnkit_attention_forward, backend=backend))
    return name


# ---- masks: transformers' index functions read back into attnkit's structured masks ---------------------------

@functools.cache
def _codes() -> dict:
    """The code objects of transformers' mask building blocks (their closures are recognized by code, not name)."""
    from transformers import masking_utils as mu

    one = torch.zeros(1, 1, dtype=torch.long)
    return {
        mu.and_masks(mu.causal_mask_function).__code__: "and",
        mu.or_masks(mu.causal_mask_function).__code__: "or",
        mu.causal_mask_function.__code__: "causal",
        mu.bidirectional_mask_function.__code__: "full",
        mu.sliding_window_overlay(1).__code__: "sliding",
        mu.sliding_window_bidirectional_overlay(1).__code__: "sliding_bidirectional",
        mu.padding_mask_function(one.bool()).__code__: "padding",
        mu.packed_sequence_mask_function(one).__code__: "packed",
        mu.remap_positions_for_packed_sequence(mu.causal_mask_function, one).__code__: "remap",
        mu.add_offsets_to_mask_function(mu.causal_mask_function, 0, 0).__code__: "offsets",
    }


def _closure(fn: Callable) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True))


def _parts(fn: Callable) -> list[tuple[str, object]] | None:
    """``fn`` as a flat list of ``(kind, argument)`` to intersect, or None when some part is not recognized."""
    kind = _codes().get(getattr(fn, "__code__", None))
    if kind is None:
        return None
    env = _closure(fn)
    if kind == "and":
        out = []
        for f in env["mask_functions"]:
            sub = _parts(f)
            if sub is None:
                return None
            out += sub
        return out
    if kind in ("or", "offsets"):
        return None  # a union (image tokens, ...) or a hand-made offset: kept as a mask_mod
    if kind == "remap":  # positions remapped per packed document: causal / window are shift-invariant
        inner = _parts(env["mask_function"])
        if inner is None or any(k not in ("causal", "full", "sliding", "sliding_bidirectional") for k, _ in inner):
            return None
        return inner
    arg = {"sliding": "sliding_window", "sliding_bidirectional": "sliding_window", "padding": "padding_mask",
           "packed": "packed_sequence_mask"}.get(kind)
    return [(kind, env[arg] if arg else None)]


def _key_padding(keep: Tensor) -> _masks.Mask | None:
    """A ``(B, S)`` boolean key mask (True = a real token) as the narrowest attnkit mask that says it."""
    B, S = keep.shape
    if tracing():
        return _masks.dense(keep[:, None, None, :])  # (B, 1, 1, S): no data-dependent branch under compile
    if bool(keep.all()):
        return None
    n = keep.sum(-1)  # (B,)
    j = torch.arange(S, device=keep.device)
    if torch.equal(keep, j[None, :] < n[:, None]):
        return _masks.padding(n)  # right padding: keys j < n[b]
    if torch.equal(keep, j[None, :] >= (S - n)[:, None]):
        return ~_masks.padding(S - n)  # left padding: keys j >= S - n[b]
    return _masks.dense(keep[:, None, None, :])  # (B, 1, 1, S): holes anywhere, still one value per key


def _as_int(x) -> int:
    return int(x) if isinstance(x, Tensor) else x


def attnkit_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Callable | None = None, attention_mask: Tensor | None = None,
                 **kwargs) -> _masks.Mask:
    """transformers' mask request (``AttentionMaskInterface`` signature) as a structured attnkit mask.

    Args:
        batch_size, q_length, kv_length: the sizes the layer's attention will have (``B``, ``L``, ``S``).
        q_offset, kv_offset: global position of the first query / key (KV caches).
        mask_function: transformers' composed ``(b, h, q_idx, kv_idx) -> bool`` in global positions.
        attention_mask: the 2-D padding mask ``(B, >= kv_offset + S)``, True = a real token.
        kwargs: the other arguments transformers passes (``local_size``, ``dtype``, ``config``, ...), unused.

    Returns:
        An attnkit :class:`~attnkit.masks.Mask` for scores ``(B, H, L, S)`` (True = may attend).
    """
    from transformers import masking_utils as mu

    mask_function = mu.causal_mask_function if mask_function is None else mask_function
    L, S = q_length, kv_length
    q0, k0 = _as_int(q_offset), _as_int(kv_offset)
    aligned = q0 - k0 == S - L  # the queries are the last keys' positions: bottom-right alignment
    parts = _parts(mask_function)
    out: list[_masks.Mask] = []
    if parts is None:  # not a composition we know: attnkit evaluates transformers' function itself
        def shifted(b, h, q, kv):
            return mask_function(b, h, q + q0, kv + k0)
        shifted.__name__ = getattr(mask_function, "__name__", "mask_function")
        out.append(_masks.mask_mod(shifted, B=batch_size))
    else:
        kinds = dict(parts)
        if "packed" in kinds and (L != S or q0 or k0):
            raise ValueError(f"packed sequences need self-attention without a cache (L == S, no offsets); got "
                             f"L={L}, S={S}, offsets ({q0}, {k0}).")
        if "causal" in kinds:
            left = kinds["sliding"] - 1 if "sliding" in kinds else None  # kv > q - w: the query and w - 1 before
            band = _masks.window(left, 0) if aligned else _masks.window(left, 0, align="top_left")
            out.append(band if aligned else band.offset(q0, k0, L=q0 + L, S=k0 + S))
        elif "sliding" in kinds:  # an overlay without causality: keys after the query stay allowed
            band = _masks.window(kinds["sliding"] - 1, None, align="bottom_right" if aligned else "top_left")
            out.append(band if aligned else band.offset(q0, k0, L=q0 + L, S=k0 + S))
        if "sliding_bidirectional" in kinds:
            w = kinds["sliding_bidirectional"]
            band = _masks.window(w, w, align="bottom_right" if aligned else "top_left")
            out.append(band if aligned else band.offset(q0, k0, L=q0 + L, S=k0 + S))
        if "packed" in kinds:
            out.append(_masks.documents(ids=kinds["packed"].expand(batch_size, -1)))
        if "padding" in kinds:  # a padding function inside the composition (not the usual attention_mask)
            attention_mask = kinds["padding"] if attention_mask is None else attention_mask & kinds["padding"]
    if attention_mask is not None:
        keep = attention_mask.bool()[:, k0:k0 + S]  # (B, <= S)
        if keep.shape[-1] < S:  # transformers pads a short 2-D mask with "not a token" (static caches)
            keep = torch.nn.functional.pad(keep, (0, S - keep.shape[-1]), value=False)
        pad = _key_padding(keep.expand(batch_size, -1))
        if pad is not None:
            out.append(pad)
    if not out:
        return _masks.full()
    mask = out[0]
    for m in out[1:]:
        mask = mask & m
    return mask


# ---- attention ---------------------------------------------------------------------------------------------

def _weights_requested() -> bool:
    """Whether the model call collects attention weights (transformers 5 records them through forward hooks
    when ``output_attentions=True``, without telling the attention function)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: always return them, as eager does
        return True
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def _softcap(cap: float) -> Callable:
    def softcap(score, b, h, q_idx, kv_idx):
        # score' = cap * tanh(score / cap) (Gemma 2)
        return torch.tanh(score / cap) * cap
    return softcap


def attnkit_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: _masks.Mask | Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, softcap: float | None = None,
                              sliding_window: int | None = None, s_aux: Tensor | None = None,
                              backend: str = "auto", **kwargs) -> tuple[Tensor, Tensor | None]:
    """transformers' attention function (``AttentionInterface`` signature) on attnkit.

    Args:
        module: the attention layer (read for ``is_causal`` when no mask came).
        query, key, value: ``(B, Hq, L, D)``, ``(B, Hkv, S, D)``; ``Hq`` a multiple of ``Hkv`` (GQA).
        attention_mask: the mask :func:`attnkit_mask` built; a 4-D boolean tensor (True = attend) or an additive
            float tensor a caller prepared itself; or None (causal per ``module.is_causal``).
        dropout: dropout on the weights (transformers passes 0.0 when the module is not training).
        scaling: multiplier on ``q . k`` (default ``1 / sqrt(D)``).
        softcap: Gemma 2's logit soft-cap ``cap * tanh(s / cap)``.
        sliding_window: used only when no mask came (the mask already holds the window otherwise).
        s_aux: per-head sink logits ``(Hq,)`` (GPT-OSS): a virtual key with that score and a zero value.
        backend: :func:`attnkit.functional.attention`'s ``backend`` (set by :func:`register`).

    Returns:
        ``(out, weights)``: out ``(B, L, Hq, D)`` contiguous, weights ``(B, Hq, L, S)`` or None.

    Raises:
        ValueError: sinks with a gradient required; a mask attnkit cannot read.
    """
    bias = None
    mask = attention_mask
    if isinstance(mask, Tensor):
        if mask.dtype == torch.bool:
            mask = _masks.dense(mask)
        else:  # an additive mask a caller built (eager style): it is a bias on the scores
            bias, mask = mask.to(query.dtype), None
    elif mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        if causal and query.shape[-2] > 1:
            mask = _masks.causal() if sliding_window is None else _masks.window(sliding_window - 1, 0)
    elif not isinstance(mask, _masks.Mask):
        raise ValueError(f"attention_mask must be an attnkit Mask, a tensor or None; got {type(mask).__name__}. "
                         "Build the model with attn_implementation='attnkit' after attnkit's register().")
    if s_aux is not None and torch.is_grad_enabled() and (
            s_aux.requires_grad or query.requires_grad or key.requires_grad or value.requires_grad):
        raise ValueError("attention sinks (s_aux) are supported by attnkit for inference only: attnkit's "
                         "log-sum-exp carries no gradient. Run under torch.no_grad() or use "
                         "attn_implementation='eager' to train.")
    want_weights = _weights_requested()
    result = _functional.attention(
        query, key, value, mask=mask, bias=bias, scale=scaling, dropout_p=float(dropout),
        score_mod=None if softcap is None else _softcap(float(softcap)),
        return_weights=want_weights, return_lse=s_aux is not None, backend=backend)
    out = result[0] if isinstance(result, tuple) else result  # (B, H, L, D)
    weights = result[1] if want_weights else None  # (B, H, L, S)
    if s_aux is not None:
        lse = result[-1]  # (B, H, L)
        # a sink of logit s per head: out' = out * e^lse / (e^lse + e^s) = out * sigmoid(lse - s)
        keep = torch.sigmoid(lse - s_aux.to(lse.dtype).view(1, -1, 1)).nan_to_num(0.0)  # (B, H, L)
        out = out * keep.unsqueeze(-1).to(out.dtype)
        if weights is not None:
            weights = weights * keep.unsqueeze(-1).to(weights.dtype)
    return out.transpose(1, 2).contiguous(), weights  # (B, L, H, D)
