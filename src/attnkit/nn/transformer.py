"""Transformer encoder and decoder layers built on :class:`attnkit.nn.multihead.MultiHeadAttention`.

Letters: ``B`` batch, ``L`` target length, ``S`` memory (source) length, ``E`` embed_dim, ``H`` heads.

Pre-norm (``norm_first=True``, the default)::

    x = x + Dropout(SelfAttn(LN(x)))
    x = x + Dropout(FF(LN(x)))                FF(x) = W_2 Dropout(act(W_1 x))

Post-norm (``norm_first=False``, the original paper)::

    x = LN(x + Dropout(SelfAttn(x)))
    x = LN(x + Dropout(FF(x)))

The decoder adds ``x = x + Dropout(CrossAttn(LN(x), memory))`` between the two. Sub-module names follow
``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` (``self_attn``, ``multihead_attn``,
``linear1``, ``linear2``, ``norm1..3``, ``dropout1..3``).

Paper: https://arxiv.org/abs/1706.03762 (section 3.1); pre-norm: https://arxiv.org/abs/2002.04745
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit import masks as _masks
from attnkit._checks import check_int, check_probability
from attnkit.masks import Mask
from attnkit.nn.multihead import MultiHeadAttention

__all__ = ["TransformerEncoderLayer", "TransformerDecoderLayer"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu}


def _activation(activation) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if isinstance(activation, str) and activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation]
    raise ValueError(f"activation must be 'gelu', 'relu' or a callable; got {activation!r}.")


class _LayerBase(nn.Module):
    """What both layers share: norms, dropouts and the feed-forward block ``W_2 Dropout(act(W_1 x))``."""

    def _init_ff(self, embed_dim, ff_dim, dropout, activation, layer_norm_eps, bias, factory, n_norms):
        check_int("embed_dim", embed_dim, minimum=1)
        ff_dim = 4 * embed_dim if ff_dim is None else check_int("ff_dim", ff_dim, minimum=1)
        self.ff_dim = ff_dim
        self.activation = _activation(activation)
        self.linear1 = nn.Linear(embed_dim, ff_dim, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ff_dim, embed_dim, bias=bias, **factory)
        for i in range(1, n_norms + 1):
            setattr(self, f"norm{i}", nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory))
            setattr(self, f"dropout{i}", nn.Dropout(dropout))

    def _ff(self, x: Tensor) -> Tensor:
        # FF(x) = W_2 Dropout(act(W_1 x))
        return self.linear2(self.dropout(self.activation(self.linear1(x))))  # (B, L, E)


class TransformerEncoderLayer(_LayerBase):
    """One Transformer encoder layer: self-attention then a feed-forward block, each with a residual.

    Args:
        embed_dim: token size ``E``.
        num_heads: attention heads ``H`` (divides ``E``).
        ff_dim: hidden size of the feed-forward block (default ``4 E``).
        dropout: dropout on attention weights, on both residual branches and inside the feed-forward block.
        norm_first: pre-norm (default) or post-norm (original paper).
        activation: ``"gelu"`` (default), ``"relu"`` or a callable.
        num_kv_heads: grouped-query key/value heads (default ``num_heads``).
        layer_norm_eps: LayerNorm epsilon.
        bias: biases in the linear maps and LayerNorms.
        device, dtype: passed to the parameters.

    Shape:
        x ``(B, L, E)`` -> ``(B, L, E)``; weights ``(B, H, L, L)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        ff_dim: int | None = None,
        dropout: float = 0.0,
        *,
        norm_first: bool = True,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        num_kv_heads: int | None = None,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dropout = check_probability("dropout", dropout)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiHeadAttention(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, dropout=dropout, bias=bias, **factory
        )
        self._init_ff(embed_dim, ff_dim, dropout, activation, layer_norm_eps, bias, factory, n_norms=2)
        self.norm_first = bool(norm_first)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Mask | Tensor | None = None,
        bias: Tensor | None = None,
        need_weights: bool = False,
        rotary=None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Apply the layer.

        Args:
            x: tokens ``(B, L, E)``.
            mask: True = may attend (a Mask such as ``masks.padding(lengths)`` or ``masks.window(w, w)``, or a
                bool tensor); see :meth:`MultiHeadAttention.forward`.
            bias: additive float term on the attention scores (ALiBi, relative position).
            need_weights: also return the per-head attention weights.
            rotary: passed to :meth:`MultiHeadAttention.forward`.

        Returns:
            ``x``, or ``(x, weights)`` with weights ``(B, H, L, L)``.

        Shape:
            ``(B, L, E)`` -> ``(B, L, E)``.
        """
        h = self.norm1(x) if self.norm_first else x
        res = self.self_attn(h, mask=mask, bias=bias, need_weights=need_weights, rotary=rotary)
        a, weights = res if need_weights else (res, None)
        if self.norm_first:
            x = x + self.dropout1(a)  # (B, L, E)
            x = x + self.dropout2(self._ff(self.norm2(x)))  # (B, L, E)
        else:
            x = self.norm1(x + self.dropout1(a))  # (B, L, E)
            x = self.norm2(x + self.dropout2(self._ff(x)))  # (B, L, E)
        return (x, weights) if need_weights else x


class TransformerDecoderLayer(_LayerBase):
    """One Transformer decoder layer: self-attention, cross-attention to ``memory``, feed-forward.

    Args: as :class:`TransformerEncoderLayer`, plus
        memory_dim: feature size of ``memory`` (default ``embed_dim``).

    The self-attention is not causal by itself: pass ``self_mask=masks.causal()`` (combined with padding as
    ``masks.causal() & masks.padding(lengths)`` if needed).

    Shape:
        x ``(B, L, E)``, memory ``(B, S, E_m)`` -> ``(B, L, E)``; self weights ``(B, H, L, L)``,
        cross weights ``(B, H, L, S)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        ff_dim: int | None = None,
        dropout: float = 0.0,
        *,
        norm_first: bool = True,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        num_kv_heads: int | None = None,
        memory_dim: int | None = None,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dropout = check_probability("dropout", dropout)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiHeadAttention(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, dropout=dropout, bias=bias, **factory
        )
        self.multihead_attn = MultiHeadAttention(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=memory_dim, vdim=memory_dim,
            dropout=dropout, bias=bias, **factory,
        )
        self._init_ff(embed_dim, ff_dim, dropout, activation, layer_norm_eps, bias, factory, n_norms=3)
        self.norm_first = bool(norm_first)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        self_mask: Mask | Tensor | None = None,
        memory_mask: Mask | Tensor | None = None,
        self_bias: Tensor | None = None,
        memory_bias: Tensor | None = None,
        need_weights: bool = False,
        prefix: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Apply the layer.

        Args:
            x: target tokens ``(B, L, E)``.
            memory: encoder output ``(B, S, E_m)``.
            self_mask: True = may attend, over ``(L, L)``; usually ``masks.causal()``.
            memory_mask: True = may attend, over ``(L, S)``; usually ``masks.padding(source_lengths)``.
            self_bias, memory_bias: additive float terms on the two attentions' scores.
            need_weights: also return both attentions' per-head weights.
            prefix: this layer's inputs at the ``P`` earlier positions ``(B, P, E)``, for decoding one step at a
                time: the self-attention reads its keys and values from ``cat(prefix, x)`` and ``x`` holds
                positions ``P .. P + L - 1`` (``masks.causal()`` aligns bottom-right, so it stays right; a single
                new position needs no mask). The outputs equal those of the whole sequence at these positions,
                without recomputing the earlier ones. Self weights are then ``(B, H, L, P + L)``. :meth:`step`
                is the faster form: it caches projected keys and values instead of inputs.

        Returns:
            ``x``, or ``(x, self_weights (B, H, L, L), cross_weights (B, H, L, S))``.

        Shape:
            ``(B, L, E)``, ``(B, S, E_m)`` -> ``(B, L, E)``.
        """
        if not isinstance(memory, Tensor) or memory.ndim != 3:
            got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"memory must be a (B, S, E_m) tensor (encoder output); got {got}.")
        h = self.norm1(x) if self.norm_first else x
        kv = None  # self-attention over x alone
        if prefix is not None:
            if not isinstance(prefix, Tensor) or prefix.ndim != 3 or prefix.shape[0] != x.shape[0] \
                    or prefix.shape[2] != x.shape[2]:
                got = tuple(prefix.shape) if isinstance(prefix, Tensor) else type(prefix).__name__
                raise ValueError(f"prefix must be a (B, P, E) = ({x.shape[0]}, P, {x.shape[2]}) tensor of this "
                                 f"layer's earlier inputs; got {got}.")
            ctx = torch.cat([prefix, x], 1)  # (B, P + L, E)
            kv = self.norm1(ctx) if self.norm_first else ctx
        res = self.self_attn(h, kv, mask=self_mask, bias=self_bias, need_weights=need_weights)
        return self._after_self_attention(x, res, need_weights, lambda h: self.multihead_attn(
            h, memory, mask=memory_mask, bias=memory_bias, need_weights=need_weights))

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """The cross-attention's keys and values of ``memory``, for :meth:`step`: compute them once per source
        sentence instead of at every decoding step. Shape: ``(B, S, E_m)`` -> two ``(B, G, S, D)``."""
        if not isinstance(memory, Tensor) or memory.ndim != 3:
            got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"memory must be a (B, S, E_m) tensor (encoder output); got {got}.")
        return self.multihead_attn.project_kv(memory)

    def step(
        self,
        x: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        past_kv: tuple[Tensor, Tensor] | None = None,
        *,
        memory_mask: Mask | Tensor | None = None,
        memory_bias: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple:
        """Decode new positions with key/value caches: what ``forward(x, memory, self_mask=masks.causal(),
        prefix=...)`` gives at these positions, without re-projecting the earlier positions or the memory.

        Args:
            x: this layer's inputs at the new positions ``P .. P + L - 1`` ``(B, L, E)`` (usually ``L = 1``).
            memory_kv: :meth:`project_memory` of the encoder output, computed once per source.
            past_kv: the self-attention keys and values of the ``P`` earlier positions, as returned by the
                previous call (``None`` or ``P = 0`` at the start).
            memory_mask, memory_bias, need_weights: as in :meth:`forward`; the self-attention is causal.

        Returns:
            ``(x, past_kv)`` with ``past_kv`` now holding all ``P + L`` positions ``(B, G, P + L, D)`` each, or
            ``(x, past_kv, self_weights (B, H, L, P + L), cross_weights (B, H, L, S))`` with ``need_weights``.
        """
        h = self.norm1(x) if self.norm_first else x  # the self-attention's queries, keys and values
        k, v = self.self_attn.project_kv(h)  # (B, G, L, D) each
        if past_kv is not None:
            if not (isinstance(past_kv, tuple) and len(past_kv) == 2 and all(
                    isinstance(t, Tensor) and t.ndim == 4 and t.shape[:2] == k.shape[:2] and t.shape[3] == k.shape[3]
                    for t in past_kv)):
                got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in past_kv] \
                    if isinstance(past_kv, tuple) else type(past_kv).__name__
                raise ValueError(f"past_kv must be the pair of (B, G, P, D) = ({k.shape[0]}, {k.shape[1]}, P, "
                                 f"{k.shape[3]}) tensors returned by the previous step; got {got}.")
            k, v = torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2)  # (B, G, P + L, D)
        # causal aligns bottom-right: new position P + i sees keys 0 .. P + i; one new position sees them all
        self_mask = _masks.causal() if x.shape[1] > 1 else None
        res = self.self_attn(h, kv=(k, v), mask=self_mask, need_weights=need_weights)
        out = self._after_self_attention(x, res, need_weights, lambda h: self.multihead_attn(
            h, kv=memory_kv, mask=memory_mask, bias=memory_bias, need_weights=need_weights))
        return (out[0], (k, v), *out[1:]) if need_weights else (out, (k, v))

    def _after_self_attention(self, x: Tensor, res, need_weights: bool, cross: Callable):
        """The residual around the self-attention result ``res``, then cross-attention (``cross(h)``) and
        feed-forward blocks."""
        a, self_weights = res if need_weights else (res, None)
        x = x + self.dropout1(a) if self.norm_first else self.norm1(x + self.dropout1(a))  # (B, L, E)
        h = self.norm2(x) if self.norm_first else x
        res = cross(h)
        c, cross_weights = res if need_weights else (res, None)
        x = x + self.dropout2(c) if self.norm_first else self.norm2(x + self.dropout2(c))  # (B, L, E)
        if self.norm_first:
            x = x + self.dropout3(self._ff(self.norm3(x)))  # (B, L, E)
        else:
            x = self.norm3(x + self.dropout3(self._ff(x)))  # (B, L, E)
        return (x, self_weights, cross_weights) if need_weights else x
