"""A drop-in for ``torch.nn.MultiheadAttention`` that runs on :func:`attnkit.functional.attention`.

Same constructor, same parameter names (``load_state_dict(torch_module.state_dict())`` works both ways),
same ``forward`` signature and return values, same layouts (seq-first by default) and torch's mask meaning:
a boolean ``key_padding_mask`` / ``attn_mask`` entry of True means IGNORE, a float one is added to the scores.
This is the one place in attnkit that accepts that meaning; masks are converted at the boundary into attnkit's
(True = may attend) ``mask`` and a float ``bias``.

Letters: ``N`` batch, ``L`` target length, ``S`` source length, ``E`` embed_dim, ``H`` num_heads,
``D`` head_dim.

One deliberate difference: a query that may attend to no key gets zero weights and a zero attention output
(plus the output projection's bias), where torch returns NaN.

What else is torch's, so that a swap changes nothing downstream:

- **strides**: the output is laid out as torch lays it out on the path torch would take: contiguous
  ``(L, N, E)`` (seq-first; the batch-first slow path returns its transpose, a non-contiguous ``(N, L, E)``),
  contiguous ``(N, L, E)`` where torch would run its native fast-path kernel (eval, no autograd, batch-first
  self-attention, ...). A following ``nn.Dropout`` then draws the same pattern under the same seed.
- **no data-dependent Python branch** in ``forward``: ``torch.compile(fullgraph=True)`` and ``torch.export``
  trace it with masks (attnkit's dispatch picks only its traceable kernels under tracing).
- **NestedTensor** input where torch accepts it (its fast path: eval, no autograd, batch-first self-attention,
  no masks): padded, attended with a ``masks.padding`` of the true lengths, returned nested; elsewhere torch's
  ``AssertionError``.
- **exception types**: invalid shapes raise :class:`CompatError`, a ``ValueError`` (attnkit's rule) that is
  also the ``AssertionError`` / ``RuntimeError`` torch raises for them, with torch's wording.
- **TorchScript** (``torch.jit.script``) is not supported, by design: the forward runs attnkit's Python
  dispatch (mask objects, kernel choice, ``score_mod`` callables) that TorchScript cannot compile, and
  TorchScript is deprecated in torch 2.13; ``torch.compile(fullgraph=True)`` / ``torch.export`` are the
  supported captures. Scripting raises :class:`CompatError` saying so. (A ``__prepare_scriptable__`` that
  scripts torch's own class instead was tried and rejected: TorchScript then swaps it into the *eager* parent
  module too, silently turning attnkit off.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit import masks as _masks
from attnkit._checks import check_int, check_probability
from attnkit.functional.attention import attention
from attnkit.nn._torch_fastpath import make_fx_tracing as _make_fx_tracing
from attnkit.nn._torch_fastpath import why_not_fast_path as _why_not_fast_path

__all__ = ["MultiheadAttention"]


class CompatError(ValueError, AssertionError, RuntimeError):
    """Bad input where torch raises ``AssertionError`` (shapes) or ``RuntimeError`` (``is_causal`` without a
    mask); also a ``ValueError``, as attnkit's rule asks, so ``except`` clauses written for either still work."""


class CompatTypeError(TypeError, AssertionError):
    """A mask of a dtype torch refuses with ``AssertionError``; also a ``TypeError``, as attnkit's rule asks."""


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention``'s interface on attnkit's attention.

    A subclass of ``torch.nn.MultiheadAttention`` that replaces only ``forward``, so ``isinstance`` checks,
    parameter names, initialisation and ``state_dict`` are torch's. Note: inside
    ``torch.nn.TransformerEncoderLayer`` in eval mode without autograd, torch's "fast path" reads the
    parameters and calls its native kernel directly, for this class as for its parent.

    ``out = concat_h softmax(Q_h K_h^T / sqrt(D) + attn_mask + key_padding_mask) V_h  W_o``

    Args:
        embed_dim: ``E``, size of queries and of the output.
        num_heads: ``H``; must divide ``embed_dim``.
        dropout: dropout on the attention weights (training mode only).
        bias: biases on the input and output projections (``in_proj_bias``, ``out_proj.bias``).
        add_bias_kv: append a learned key ``bias_k`` and value ``bias_v`` to the key/value sequences.
        add_zero_attn: append a zero key and value (per head, after projection).
        kdim, vdim: key / value input sizes (default ``E``; otherwise ``q/k/v_proj_weight`` replace
            ``in_proj_weight``).
        batch_first: inputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        device, dtype: passed to the parameters.

    Shape:
        - query ``(L, N, E)`` / ``(N, L, E)`` batch-first / ``(L, E)`` unbatched; key ``(S, N, E_k)``;
          value ``(S, N, E_v)`` in the same layout; or a NestedTensor ``(N, L_i, E)`` on torch's fast path.
        - key_padding_mask ``(N, S)`` (``(S,)`` unbatched); attn_mask ``(L, S)`` or ``(N * H, L, S)``.
        - output in the query's layout; weights ``(N, L, S)`` averaged or ``(N, H, L, S)`` per head
          (``(L, S)`` / ``(H, L, S)`` unbatched).

    Raises:
        ValueError: non-positive sizes, ``embed_dim`` not divisible by ``num_heads`` (:class:`CompatError`,
            also torch's ``AssertionError``), bad ``dropout``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        check_int("embed_dim", embed_dim, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        if embed_dim % num_heads != 0:
            raise CompatError(
                "embed_dim must be divisible by num_heads; "
                f"got embed_dim={embed_dim}, num_heads={num_heads}."
            )
        if kdim is not None:
            check_int("kdim", kdim, minimum=1)
        if vdim is not None:
            check_int("vdim", vdim, minimum=1)
        dropout = check_probability("dropout", dropout)
        # the parent builds the very same parameters (names, shapes, initialisation) as torch
        super().__init__(
            embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device,
            dtype=dtype,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Compute attention as ``torch.nn.MultiheadAttention.forward`` does.

        Args:
            query, key, value: see the class ``Shape`` block.
            key_padding_mask: bool (True = ignore that key) or float (added) ``(N, S)``.
            need_weights: also return the attention weights (otherwise the second item is ``None``).
            attn_mask: bool (True = ignore) or float (added) ``(L, S)`` or ``(N * H, L, S)``.
            average_attn_weights: average the returned weights over heads.
            is_causal: a hint that ``attn_mask`` is the causal mask; as in torch, it needs ``attn_mask``.

        Returns:
            ``(attn_output, attn_weights or None)``, laid out as torch's (see the module docstring).

        Raises:
            TypeError / ValueError (:class:`CompatError`, also torch's ``AssertionError`` / ``RuntimeError``):
            wrong ranks or sizes, masks of the wrong shape or dtype, ``is_causal`` without ``attn_mask``,
            NestedTensor input off torch's fast path.
        """
        why_not_fast = _why_not_fast_path(self, query, key, value, key_padding_mask, attn_mask)
        if query.is_nested or key.is_nested or value.is_nested:
            if why_not_fast:
                raise CompatError("MultiheadAttention does not support NestedTensor outside of its fast path. "
                                  f"The fast path was not hit because {why_not_fast}")
            return self._nested_forward(query, need_weights, average_attn_weights)
        is_batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)  # (1, ., E)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (N, ., E)
        N, L, _ = query.shape
        S = key.shape[1]
        if is_causal and attn_mask is None:
            raise CompatError(
                "Need attn_mask if specifying the is_causal hint (as in torch.nn.MultiheadAttention); pass "
                "attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L)."
            )
        # torch: with the hint, no key padding and no weights asked, the hint replaces attn_mask (SDPA's
        # is_causal, top-left aligned), whatever attn_mask holds
        causal_hint = is_causal and key_padding_mask is None and not need_weights
        allowed, add = self._convert_masks(key_padding_mask, None if causal_hint else attn_mask, N, L, S,
                                           query.dtype)
        if causal_hint:
            allowed = _masks.causal(align="top_left")
        out, weights = self._attend(query, key, value, allowed, add, need_weights)  # (L, N, E), (N, H, L, S)
        if not is_batched:
            out = out.squeeze(1)  # (L, E), contiguous as torch's
        elif self.batch_first:
            out = out.transpose(0, 1)  # (N, L, E): torch's slow path returns this view
            if not why_not_fast or _make_fx_tracing():
                out = out.contiguous()  # torch's native fast-path kernel returns contiguous (N, L, E)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, S)
            if not is_batched:
                weights = weights.squeeze(0)  # (L, S) or (H, L, S)
        return out, weights

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: refuse with the reason instead of a TorchScript parse error."""
        raise CompatError(
            "attnkit.nn.compat.MultiheadAttention cannot be compiled by torch.jit.script: its forward runs "
            "attnkit's Python dispatch (mask objects, kernel choice), and TorchScript is deprecated in torch 2.13. "
            "Use torch.compile(module, fullgraph=True) or torch.export.export, which both capture it."
        )

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, allowed, add: Tensor | None,
                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Projections, attention and the output projection on batch-first inputs ``(N, L, E)``.

        Returns:
            out ``(L, N, E)`` contiguous (torch's layout before any transpose), weights ``(N, H, L, S')`` or None.
        """
        N, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        # Q = query W_q + b_q, K = key W_k + b_k, V = value W_v + b_v
        w_q, w_k, w_v = self._in_proj_weights()
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if b_q is not None and b_q.dtype != w_q.dtype:  # torch promotes a bias of another dtype (matmul + add)
            dt = torch.promote_types(b_q.dtype, w_q.dtype)
            b_q, b_k, b_v = b_q.to(dt), b_k.to(dt), b_v.to(dt)
        q = F.linear(query, w_q, b_q)  # (N, L, E)
        k = F.linear(key, w_k, b_k)  # (N, S, E)
        v = F.linear(value, w_v, b_v)  # (N, S, E)
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E).to(k.dtype)], dim=1)  # (N, S+1, E)
            v = torch.cat([v, self.bias_v.expand(N, 1, E).to(v.dtype)], dim=1)  # (N, S+1, E)
            extra += 1
        q = q.view(N, L, H, D).transpose(1, 2)  # (N, H, L, D)
        k = k.view(N, S + extra, H, D).transpose(1, 2)  # (N, H, S', D)
        v = v.view(N, S + extra, H, D).transpose(1, 2)  # (N, H, S', D)
        if self.add_zero_attn:
            zeros = k.new_zeros(N, H, 1, D)  # (N, H, 1, D)
            k = torch.cat([k, zeros], dim=2)  # (N, H, S'+1, D)
            v = torch.cat([v, zeros], dim=2)  # (N, H, S'+1, D)
            extra += 1
        if add is not None:
            add = add.to(q.dtype)  # the projections' dtype (differs from query's under autocast)
        if extra and isinstance(allowed, Tensor):  # the appended keys are never masked
            allowed = F.pad(allowed, (0, extra), value=True)  # (., ., ., S + extra)
        if extra and add is not None:
            add = F.pad(add, (0, extra), value=0.0)  # (., ., ., S + extra)
        dropout_p = self.dropout if self.training else 0.0
        res = attention(q, k, v, mask=allowed, bias=add, dropout_p=dropout_p, return_weights=need_weights)
        out, weights = res if need_weights else (res, None)
        # torch's layout: heads merged seq-first, one (L * N, E) matmul, viewed (L, N, E)
        out = out.permute(2, 0, 1, 3).reshape(L * N, E)  # (L * N, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(L, N, -1)  # (L, N, E)
        return out, None if weights is None else weights.contiguous()

    def _nested_forward(self, query: Tensor, need_weights: bool, average_attn_weights: bool):
        """Self-attention on a NestedTensor ``(N, L_i, E)`` (torch's fast path accepts these): padded to
        ``(N, L, E)``, keys past each ``L_i`` masked, the output nested again; weights padded with zeros."""
        lengths = [t.shape[0] for t in query.unbind()]
        x = torch.nested.to_padded_tensor(query, 0.0)  # (N, L, E)
        N, L, _ = x.shape
        n = torch.tensor(lengths, device=x.device)  # (N,)
        out, weights = self._attend(x, x, x, _masks.padding(n), None, need_weights)  # (L, N, E)
        out = torch.nested.nested_tensor([out[:m, i] for i, m in enumerate(lengths)], layout=query.layout)
        if weights is not None:
            real = torch.arange(L, device=x.device)[None, :] < n[:, None]  # (N, L): real query rows
            weights = weights * real[:, None, :, None]  # (N, H, L, L)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, L)
        return out, weights

    # ------------------------------------------------------------------ helpers
    def _in_proj_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            return self.in_proj_weight.chunk(3)  # 3 x (E, E)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """torch's shape rules with torch's words (``F._mha_shape_check``) plus attnkit's finer ones; returns
        whether the input is batched."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                got = x.dtype if isinstance(x, Tensor) else type(x).__name__
                raise TypeError(f"{name} must be a floating-point tensor; got {got}.")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None:
                _check_torch_mask(name, m)
        if query.ndim not in (2, 3):
            raise CompatError(
                f"query should be unbatched 2D or batched 3D tensor but received {query.ndim}-D query tensor "
                f"(shape {tuple(query.shape)})."
            )
        kind = "batched (3-D)" if query.ndim == 3 else "unbatched (2-D)"
        if key.ndim != query.ndim or value.ndim != query.ndim:
            raise CompatError(
                f"For {kind} `query`, expected `key` and `value` to be {query.ndim}-D but found {key.ndim}-D "
                f"and {value.ndim}-D tensors respectively (key must have as many dimensions as query)."
            )
        if key_padding_mask is not None and key_padding_mask.ndim != query.ndim - 1:
            raise CompatError(
                f"For {kind} `query`, expected `key_padding_mask` to be `None` or {query.ndim - 1}-D but found "
                f"{key_padding_mask.ndim}-D tensor instead."
            )
        if attn_mask is not None and attn_mask.ndim not in (2, 3):
            raise CompatError(
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found {attn_mask.ndim}-D "
                "tensor instead."
            )
        if query.ndim == 2 and attn_mask is not None and attn_mask.ndim == 3:
            expected = (self.num_heads, query.shape[0], key.shape[0])
            if tuple(attn_mask.shape) != expected:
                raise CompatError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}.")
        for name, x in (("key", key), ("value", value)):
            mixed_ok = torch.is_autocast_enabled(query.device.type)  # autocast unifies dtypes, as in torch
            if (x.dtype != query.dtype and not mixed_ok) or x.device != query.device:
                raise TypeError(
                    f"{name} must have the dtype and device of query ({query.dtype}, {query.device}); "
                    f"got ({x.dtype}, {x.device})."
                )
        for name, x, size, dim_name in (
            ("query", query, self.embed_dim, "embed_dim"),
            ("key", key, self.kdim, "kdim"),
            ("value", value, self.vdim, "vdim"),
        ):
            if x.shape[-1] != size:
                raise CompatError(
                    f"{name} last dimension must equal {dim_name}={size}; got {tuple(x.shape)}."
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise CompatError(
                f"key and value must have the same shape except the last dimension; got key "
                f"{tuple(key.shape)}, value {tuple(value.shape)}."
            )
        batch_dim = 0 if self.batch_first else 1
        if query.ndim == 3 and query.shape[batch_dim] != key.shape[batch_dim]:
            layout = "(N, L, E)" if self.batch_first else "(L, N, E) (batch_first=False)"
            raise CompatError(
                f"query and key must have the same batch size in layout {layout}; got query "
                f"{tuple(query.shape)}, key {tuple(key.shape)}."
            )
        return query.ndim == 3

    def _convert_masks(
        self, key_padding_mask, attn_mask, N, L, S, dtype
    ) -> tuple[Tensor | None, Tensor | None]:
        """torch masks (bool True = ignore; float = added) -> attnkit ``(allowed, bias)``.

        Shape:
            each ``(N|1, H|1, L|1, S)`` or ``None``.
        """
        H = self.num_heads
        allowed = add = None
        if attn_mask is not None:
            _check_torch_mask("attn_mask", attn_mask)
            if attn_mask.ndim == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise CompatError(
                        f"attn_mask 2-D must have shape (L, S) = {(L, S)}; got {tuple(attn_mask.shape)}."
                    )
                m = attn_mask.view(1, 1, L, S)  # (1, 1, L, S)
            elif attn_mask.ndim == 3:
                if tuple(attn_mask.shape) != (N * H, L, S):
                    raise CompatError(
                        f"attn_mask 3-D must have shape (N * num_heads, L, S) = {(N * H, L, S)}; got "
                        f"{tuple(attn_mask.shape)}."
                    )
                m = attn_mask.view(N, H, L, S)  # (N, H, L, S)
            else:
                raise CompatError(
                    f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S); got {attn_mask.ndim}-D."
                )
            if m.dtype == torch.bool:
                allowed = ~m  # torch: True = ignore -> attnkit: True = may attend
            else:
                add = m.to(dtype)
        if key_padding_mask is not None:
            _check_torch_mask("key_padding_mask", key_padding_mask)
            if tuple(key_padding_mask.shape) != (N, S):
                raise CompatError(
                    f"key_padding_mask must have shape (N, S) = {(N, S)} ((S,) unbatched); got "
                    f"{tuple(key_padding_mask.shape)}."
                )
            m = key_padding_mask.view(N, 1, 1, S)  # (N, 1, 1, S)
            if m.dtype == torch.bool:
                allowed = ~m if allowed is None else allowed & ~m
            else:
                add = m.to(dtype) if add is None else add + m.to(dtype)
        if add is not None:
            # -inf in a float mask is a hard mask: moved to `allowed` so that a fully masked row gives zeros,
            # not NaN (always, with no data-dependent branch: torch.compile / export trace this)
            blocked = add == float("-inf")
            allowed = ~blocked if allowed is None else allowed & ~blocked
            add = add.masked_fill(blocked, 0.0)
        return allowed, add


def _check_torch_mask(name: str, m) -> None:
    if not isinstance(m, Tensor):
        raise TypeError(
            f"{name} must be a tensor (bool: True = ignore, or float: added); got {type(m).__name__}."
        )
    if m.dtype != torch.bool and not m.is_floating_point():
        raise CompatTypeError(
            f"only bool and floating types of {name} are supported: {name} must be bool (True = ignore) or "
            f"floating point (added to the scores); got {m.dtype}. Convert with .bool()."
        )

