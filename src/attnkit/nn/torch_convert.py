"""Weight conversion between :class:`attnkit.nn.MultiHeadAttention` and ``torch.nn.MultiheadAttention``.

torch packs the three input projections into one ``in_proj_weight (3E, E)`` when ``kdim == vdim == embed_dim``
and keeps ``q/k/v_proj_weight`` apart otherwise; attnkit always keeps three ``nn.Linear`` (its keys and values
may have fewer heads: grouped-query attention, which torch cannot hold).
"""

from __future__ import annotations

import torch
from torch import nn


def from_torch(cls, m: nn.MultiheadAttention):
    """A :class:`MultiHeadAttention` holding copies of the weights of a ``torch.nn.MultiheadAttention``.

    Reads the packed ``in_proj_weight`` (when ``kdim == vdim == embed_dim``) or ``q/k/v_proj_weight``,
    and the biases. ``batch_first`` does not matter: attnkit is always batch-first. The training flag is
    copied. ``cls`` is the class to build (:class:`MultiHeadAttention` or a subclass).

    Raises:
        TypeError: ``m`` is not a ``torch.nn.MultiheadAttention``.
        ValueError: ``m`` uses ``add_bias_kv`` or ``add_zero_attn`` (use ``attnkit.nn.compat``), or
            has a bias on only some projections.
    """
    if not isinstance(m, nn.MultiheadAttention):
        raise TypeError(f"m must be a torch.nn.MultiheadAttention; got {type(m).__name__}.")
    if m.bias_k is not None or m.add_zero_attn:
        raise ValueError(
            "m uses add_bias_kv/add_zero_attn, which MultiHeadAttention does not have. "
            "Load its state_dict into attnkit.nn.compat.MultiheadAttention instead."
        )
    has_bias = m.in_proj_bias is not None
    if has_bias != (m.out_proj.bias is not None):
        raise ValueError(
            "m must have biases on all projections or none; got in_proj_bias "
            f"{'set' if has_bias else 'None'} and out_proj.bias "
            f"{'set' if m.out_proj.bias is not None else 'None'}."
        )
    w = m.out_proj.weight
    new = cls(
        m.embed_dim, m.num_heads, kdim=m.kdim, vdim=m.vdim, dropout=float(m.dropout), bias=has_bias,
        device=w.device, dtype=w.dtype,
    )
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)  # 3 x (E, E)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    with torch.no_grad():
        new.q_proj.weight.copy_(w_q)
        new.k_proj.weight.copy_(w_k)
        new.v_proj.weight.copy_(w_v)
        new.out_proj.weight.copy_(m.out_proj.weight)
        if has_bias:
            b_q, b_k, b_v = m.in_proj_bias.chunk(3)  # 3 x (E,)
            new.q_proj.bias.copy_(b_q)
            new.k_proj.bias.copy_(b_k)
            new.v_proj.bias.copy_(b_v)
            new.out_proj.bias.copy_(m.out_proj.bias)
    return new.train(m.training)


def to_torch(mha, *, batch_first: bool = True) -> nn.MultiheadAttention:
    """A ``torch.nn.MultiheadAttention`` holding copies of these weights.

    Args:
        batch_first: the returned module's layout (this module is batch-first; torch's default is not).

    Raises:
        ValueError: grouped-query attention (``num_kv_heads != num_heads``) has no torch equivalent.
    """
    if mha.num_kv_heads != mha.num_heads:
        raise ValueError(
            f"cannot convert grouped-query attention (num_kv_heads={mha.num_kv_heads} != "
            f"num_heads={mha.num_heads}) to torch.nn.MultiheadAttention, which has one key/value head "
            "per query head."
        )
    w = mha.out_proj.weight
    has_bias = mha.q_proj.bias is not None
    m = nn.MultiheadAttention(
        mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=has_bias, kdim=mha.kdim,
        vdim=mha.vdim, batch_first=batch_first, device=w.device, dtype=w.dtype,
    )
    with torch.no_grad():
        if m._qkv_same_embed_dim:
            w_qkv = torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight])  # (3E, E)
            m.in_proj_weight.copy_(w_qkv)
        else:
            m.q_proj_weight.copy_(mha.q_proj.weight)
            m.k_proj_weight.copy_(mha.k_proj.weight)
            m.v_proj_weight.copy_(mha.v_proj.weight)
        m.out_proj.weight.copy_(mha.out_proj.weight)
        if has_bias:
            m.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
            m.out_proj.bias.copy_(mha.out_proj.bias)
    return m.train(mha.training)
