"""When torch's ``nn.MultiheadAttention`` would run its native fast-path kernel: the compat class follows the same
rule for its output layout and for accepting NestedTensor input (:mod:`attnkit.nn.compat`)."""

from __future__ import annotations

import torch


def make_fx_tracing() -> bool:
    try:
        from torch.nn.modules.activation import _is_make_fx_tracing
    except ImportError:
        return False
    return _is_make_fx_tracing()


def why_not_fast_path(m: torch.nn.MultiheadAttention, query, key, value, key_padding_mask, attn_mask) -> str:
    """Why torch would not run its native fast-path kernel for this call ("" if it would): the same conditions,
    in the same order, as ``torch.nn.MultiheadAttention.forward`` (metadata only, no data-dependent branch).
    It decides the output's layout and whether NestedTensor input is accepted."""
    floating = [x for x in (attn_mask, key_padding_mask) if x is not None and torch.is_floating_point(x)]
    if floating:
        return "floating-point masks are not supported for fast path."
    if not torch.backends.mha.get_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() was not True"
    if query.dim() != 3:
        return f"input not batched; expected query.dim() of 3 but got {query.dim()}"
    if query is not key or key is not value:
        return "non-self attention was used (query, key, and value are not the same Tensor)"
    if m.in_proj_bias is not None and query.dtype != m.in_proj_bias.dtype:
        return f"dtypes of query ({query.dtype}) and self.in_proj_bias ({m.in_proj_bias.dtype}) don't match"
    if m.in_proj_weight is None:
        return "in_proj_weight was None"
    if query.dtype != m.in_proj_weight.dtype:
        return f"dtypes of query ({query.dtype}) and self.in_proj_weight ({m.in_proj_weight.dtype}) don't match"
    checks = [
        (m.training, "training is enabled"), (m.num_heads % 2 != 0, "self.num_heads is not even"),
        (not m.batch_first, "batch_first was not True"), (m.bias_k is not None, "self.bias_k was not None"),
        (m.bias_v is not None, "self.bias_v was not None"), (m.add_zero_attn, "add_zero_attn was enabled"),
        (not m._qkv_same_embed_dim, "_qkv_same_embed_dim was not True"),
        (query.is_nested and (key_padding_mask is not None or attn_mask is not None),
         "supplying both src_key_padding_mask and src_mask at the same time is not supported with NestedTensor "
         "input"),
        (torch.is_autocast_enabled(), "autocast is enabled"),
    ]
    for failed, why in checks:
        if failed:
            return why
    args = (query, key, value, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias)
    if torch.overrides.has_torch_function(args):
        return "some Tensor argument has_torch_function"
    devices = ("cpu", "cuda", torch._C._get_privateuse1_backend_name())
    if not all(x is None or x.device.type in devices for x in args):
        return "some Tensor argument's device is neither one of cpu, cuda or the privateuse1 backend"
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args):
        return ("grad is enabled and at least one of query or the input/output projection weights or biases "
                "requires_grad")
    if make_fx_tracing():
        return "we are running make_fx tracing"
    if m.in_proj_bias is None:
        return "in_proj_bias was None (torch's native kernel needs it)"
    return ""
