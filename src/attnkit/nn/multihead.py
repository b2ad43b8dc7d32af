"""Multi-head attention: separate q/k/v projections, grouped-query heads, conversion to and from torch.

Letters: ``B`` batch, ``L`` query length, ``S`` key length, ``E`` embed_dim, ``H`` query heads,
``G`` key/value heads (``num_kv_heads``), ``D`` head_dim ``= E / H``.

    head_h = attention(Q W_q^h, K W_k^g(h), V W_v^g(h))      g(h) = h // (H / G)
    out    = concat(head_1, ..., head_H) W_o

Paper: https://arxiv.org/abs/1706.03762 (section 3.2.2); grouped-query: https://arxiv.org/abs/2305.13245
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnkit._checks import check_int, check_probability
from attnkit.functional.attention import attention
from attnkit.masks import Mask

__all__ = ["MultiHeadAttention"]

_MASK_HINT = (
    "Pass an attnkit.masks Mask (e.g. masks.padding(lengths) or masks.causal()), a bool (L, S) tensor, "
    "or a bool (B|1, H|1, L|1, S) tensor."
)


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-query) scaled dot-product attention over batch-first tokens.

    ``out = concat_h softmax(Q_h K_g^T / sqrt(D) + bias, masked) V_g  W_o`` with ``Q_h = query W_q^h``,
    ``K_g = key W_k^g``, ``V_g = value W_v^g``; query head ``h`` reads key/value head ``g = h // (H / G)``.

    ============  =====================================
    symbol        argument
    ============  =====================================
    ``E``         ``embed_dim`` (query and output size)
    ``H``         ``num_heads``
    ``G``         ``num_kv_heads`` (default ``H``)
    ``E_k/E_v``   ``kdim`` / ``vdim`` (key/value input sizes, default ``E``)
    ``W_q..W_o``  ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``
    ============  =====================================

    Args:
        embed_dim: size ``E`` of queries and of the output; divisible by ``num_heads``.
        num_heads: number of query heads ``H``.
        num_kv_heads: number of key/value heads ``G`` (grouped-query attention); must divide ``num_heads``.
            ``1`` is multi-query attention. Default ``num_heads`` (plain multi-head attention).
        kdim: feature size of ``key`` inputs (default ``embed_dim``).
        vdim: feature size of ``value`` inputs (default ``embed_dim``).
        dropout: dropout probability on the attention weights (training mode only).
        bias: learn additive biases in the four projections.
        device, dtype: passed to the parameters.

    Shape:
        - query ``(B, L, E)``; key ``(B, S, E_k)``; value ``(B, S, E_v)``
        - output ``(B, L, E)``; weights ``(B, H, L, S)`` (``(B, L, S)`` when averaged)

    Raises:
        ValueError / TypeError: sizes that are not positive ints, ``embed_dim`` not divisible by
        ``num_heads``, ``num_heads`` not divisible by ``num_kv_heads``, bad ``dropout``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        if embed_dim % num_heads != 0:
            raise ValueError(
                "embed_dim must be divisible by num_heads; "
                f"got embed_dim={embed_dim}, num_heads={num_heads}. "
                f"Pick num_heads among the divisors of {embed_dim}."
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_int("num_kv_heads", num_kv_heads, minimum=1)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                "num_kv_heads must divide num_heads; "
                f"got num_kv_heads={num_kv_heads}, num_heads={num_heads}. "
                "Each key/value head serves an equal group of query heads."
            )
        kdim = embed_dim if kdim is None else check_int("kdim", kdim, minimum=1)
        vdim = embed_dim if vdim is None else check_int("vdim", vdim, minimum=1)
        if not isinstance(bias, bool):
            raise TypeError(
                f"bias must be a bool (learn projection biases); got {type(bias).__name__}. "
                "Additive attention biases (ALiBi, relative) go to forward(bias=...)."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim
        self.vdim = vdim
        self.dropout = check_probability("dropout", dropout)
        factory = {"device": device, "dtype": dtype}
        kv_size = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, kv_size, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim, kv_size, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform q/k/v projections and zero biases (as ``torch.nn.MultiheadAttention``)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        self.out_proj.reset_parameters()
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            s += f", num_kv_heads={self.num_kv_heads}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        return s + f", dropout={self.dropout}"

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Mask | Tensor | None = None,
        bias: Tensor | None = None,
        need_weights: bool = False,
        average_weights: bool = False,
        rotary: bool | tuple[Tensor, Tensor] | Callable | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` to ``key``/``value`` (self-attention when both are omitted).

        Args:
            query: ``(B, L, E)`` tokens.
            key: ``(B, S, E_k)``; default ``query`` (self-attention).
            value: ``(B, S, E_v)``; default ``key``.
            kv: already projected keys and values ``(K, V)``, each ``(B, G, S, D)``, from :meth:`project_kv`
                (a KV cache: an encoder's memory projected once, or a decoder's earlier positions concatenated
                with the new ones along ``S``); then ``key`` and ``value`` must be omitted.
            mask: True = may attend. An :class:`attnkit.masks.Mask` (batched masks such as padding align
                with ``B``), or a bool tensor ``(S,)``, ``(L, S)`` or ``(B|1, H|1, L|1, S)``. A 3-D tensor is
                refused as ambiguous (``(B, L, S)`` or ``(H, L, S)``?): add the missing axis yourself.
            bias: float additive term on the scores (ALiBi, relative position), same shapes as ``mask``.
            need_weights: also return the attention weights.
            average_weights: average the returned weights over heads.
            rotary: rotary position embedding on the per-head queries and keys (interleaved pairs, see
                :func:`attnkit.functional.positional.apply_rotary`). ``True``: keys at positions
                ``0..S-1`` and queries at the last ``L`` of them (bottom-right, as ``masks.causal``);
                a pair ``(query_positions (L,), key_positions (S,))`` of int tensors; or a callable
                ``rotary(q (B, H, L, D), k (B, G, S, D)) -> (q, k)`` such as
                :class:`attnkit.nn.positional.RotaryEmbedding`.

        Returns:
            ``out``, or ``(out, weights)`` when ``need_weights``. A query with no allowed key gets zero
            weights and a zero attention output (the output projection's bias is still added).

        Shape:
            ``(B, L, E)``, ``(B, S, E_k)``, ``(B, S, E_v)`` -> out ``(B, L, E)``;
            weights ``(B, H, L, S)``, or ``(B, L, S)`` with ``average_weights``.

        Raises:
            TypeError / ValueError: wrong rank, sizes, dtypes or devices, or a mask/bias that does not
            broadcast to ``(B, H, L, S)``.
        """
        H, D = self.num_heads, self.head_dim
        if kv is not None:
            B, L, S = self._check_kv(query, key, value, kv, rotary)
            k, v = kv  # (B, G, S, D) each
        else:
            key = query if key is None else key
            value = key if value is None else value
            B, L, S = self._check_inputs(query, key, value)
            k, v = self._project_kv(key, value)  # (B, G, S, D) each
        # Q = query W_q, split into heads
        q = self.q_proj(query).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        if rotary is not None and rotary is not False:
            q, k = self._rotate(q, k, rotary)
        mask = _check_mask("mask", mask, (B, H, L, S), query.device)
        bias = _check_bias("bias", bias, (B, H, L, S), query)
        dropout_p = self.dropout if self.training else 0.0
        result = attention(q, k, v, mask=mask, bias=bias, dropout_p=dropout_p, return_weights=need_weights)
        out, weights = result if need_weights else (result, None)
        # concat(head_1..head_H) W_o
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))  # (B, L, E)
        if not need_weights:
            return out
        if average_weights:
            weights = weights.mean(dim=1)  # (B, L, S)
        return out, weights

    def project_kv(self, key: Tensor, value: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The keys and values :meth:`forward` would attend to, split into heads: ``(key W_k, value W_v)``.

        Compute them once and pass them as ``forward(query, kv=...)`` to attend to the same keys from many
        queries (cross-attention to an encoder's memory while decoding), or concatenate a step's new ones to
        the earlier ones along dim 2 (a decoder's self-attention KV cache).

        Args:
            key: ``(B, S, E_k)``. value: ``(B, S, E_v)``, default ``key``.

        Shape:
            ``(B, S, E_k)``, ``(B, S, E_v)`` -> ``(B, G, S, D)``, ``(B, G, S, D)``.
        """
        value = key if value is None else value
        self._check_kv_inputs(key, value)
        return self._project_kv(key, value)

    def _project_kv(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        # K = key W_k, V = value W_v, split into heads
        B, S, G, D = key.shape[0], key.shape[1], self.num_kv_heads, self.head_dim
        k = self.k_proj(key).view(B, S, G, D).transpose(1, 2)  # (B, G, S, D)
        v = self.v_proj(value).view(B, S, G, D).transpose(1, 2)  # (B, G, S, D)
        return k, v

    # ------------------------------------------------------------------ checks and helpers
    def _check_kv(self, query: Tensor, key, value, kv, rotary) -> tuple[int, int, int]:
        """Checks for ``forward(query, kv=(K, V))``; returns ``(B, L, S)``."""
        if key is not None or value is not None:
            raise ValueError("pass either key/value or kv=(K, V) (already projected), not both.")
        if rotary is not None and rotary is not False:
            raise ValueError(
                "rotary cannot be combined with kv=(K, V): the positions of already projected keys are not "
                "known here. Pass key=/value= inputs for rotary attention."
            )
        self._check_tokens("query", query, self.embed_dim, "embed_dim")
        B, L = query.shape[:2]
        G, D = self.num_kv_heads, self.head_dim
        if not (isinstance(kv, tuple) and len(kv) == 2 and all(isinstance(t, Tensor) for t in kv)):
            raise TypeError(f"kv must be a pair (K, V) of tensors from project_kv; got {type(kv).__name__}.")
        k, v = kv
        if k.ndim != 4 or k.shape[:2] != (B, G) or k.shape[3] != D or k.shape != v.shape:
            raise ValueError(
                f"kv must be two (B, G, S, D) = ({B}, {G}, S, {D}) tensors of one shape (from project_kv); got "
                f"{tuple(k.shape)} and {tuple(v.shape)}."
            )
        for name, t in (("kv[0]", k), ("kv[1]", v)):
            if t.device != query.device or (t.dtype != query.dtype and not torch.is_autocast_enabled(
                    query.device.type)):
                raise TypeError(f"{name} must have the dtype and device of query ({query.dtype}, {query.device}); "
                                f"got ({t.dtype}, {t.device}).")
        return B, L, k.shape[2]

    @staticmethod
    def _check_tokens(name: str, x, size: int, dim_name: str) -> None:
        """``x`` must be a floating (B, length, size) tensor."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, L, E); got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor; got {x.dtype}. Convert with .float()."
            )
        if x.ndim != 3:
            raise ValueError(
                f"{name} must have shape (B, length, features) (batch first); got {tuple(x.shape)}. "
                "For a single sequence use x.unsqueeze(0); for seq-first tensors use attnkit.nn.compat."
            )
        if x.shape[-1] != size:
            raise ValueError(
                f"{name} last dimension must equal {dim_name}={size}; got shape {tuple(x.shape)}."
            )

    def _check_kv_inputs(self, key: Tensor, value: Tensor) -> None:
        self._check_tokens("key", key, self.kdim, "kdim")
        self._check_tokens("value", value, self.vdim, "vdim")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key and value must agree in batch and length (B, S); got key {tuple(key.shape)} and "
                f"value {tuple(value.shape)}."
            )
        if key.device != value.device:
            raise TypeError(f"key and value must be on one device; got {key.device} and {value.device}.")

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[int, int, int]:
        self._check_tokens("query", query, self.embed_dim, "embed_dim")
        self._check_kv_inputs(key, value)
        if key.shape[0] != query.shape[0]:
            raise ValueError(
                f"key batch size must equal query batch size {query.shape[0]}; got key {tuple(key.shape)}."
            )
        # under autocast the projections bring mixed input dtypes to one, as torch's own layers allow
        same_dtype_needed = not torch.is_autocast_enabled(query.device.type)
        for name, x in (("key", key), ("value", value)):
            if (same_dtype_needed and x.dtype != query.dtype) or x.device != query.device:
                raise TypeError(
                    f"{name} must have the dtype and device of query ({query.dtype}, {query.device}); "
                    f"got ({x.dtype}, {x.device})."
                )
        return query.shape[0], query.shape[1], key.shape[1]

    def _rotate(self, q: Tensor, k: Tensor, rotary) -> tuple[Tensor, Tensor]:
        from attnkit.functional.positional import apply_rotary

        L, S = q.shape[-2], k.shape[-2]
        if callable(rotary):
            q_rot, k_rot = rotary(q, k)
            if q_rot.shape != q.shape or k_rot.shape != k.shape:
                raise ValueError(
                    f"rotary(q, k) must return tensors of the shapes it got, {tuple(q.shape)} and "
                    f"{tuple(k.shape)}; got {tuple(q_rot.shape)} and {tuple(k_rot.shape)}."
                )
            return q_rot, k_rot
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"rotary needs an even head_dim; got head_dim={self.head_dim} "
                f"(embed_dim={self.embed_dim} / num_heads={self.num_heads})."
            )
        if rotary is True:
            k_pos = torch.arange(S, device=q.device)  # (S,)
            q_pos = torch.arange(L, device=q.device) + (S - L)  # (L,) queries are the last L positions
        elif isinstance(rotary, tuple) and len(rotary) == 2:
            q_pos, k_pos = rotary
        else:
            raise TypeError(
                "rotary must be None, True, a pair (query_positions (L,), key_positions (S,)) of int "
                f"tensors, or a callable (q, k) -> (q, k); got {type(rotary).__name__}."
            )
        return apply_rotary(q, q_pos), apply_rotary(k, k_pos)  # (B, H, L, D), (B, G, S, D)

    # ------------------------------------------------------------------ torch conversion
    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> MultiHeadAttention:
        """A :class:`MultiHeadAttention` holding copies of the weights of a ``torch.nn.MultiheadAttention``
        (see :func:`attnkit.nn.torch_convert.from_torch`)."""
        from attnkit.nn.torch_convert import from_torch

        return from_torch(cls, m)

    def to_torch(self, *, batch_first: bool = True) -> nn.MultiheadAttention:
        """A ``torch.nn.MultiheadAttention`` holding copies of these weights
        (see :func:`attnkit.nn.torch_convert.to_torch`)."""
        from attnkit.nn.torch_convert import to_torch

        return to_torch(self, batch_first=batch_first)


def _check_mask(name: str, mask, target: tuple[int, int, int, int], device) -> Mask | Tensor | None:
    """Return ``mask`` ready for :func:`attention`: a Mask as is, a bool tensor checked against ``target``."""
    if mask is None or isinstance(mask, Mask):
        return mask
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{name} must be an attnkit Mask or a bool tensor; got {type(mask).__name__}. {_MASK_HINT}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (True = may attend); got {mask.dtype}. "
            "Additive float terms go in bias=...; torch-style masks (True = ignore) belong to "
            "attnkit.nn.compat."
        )
    _check_rank_and_shape(name, mask, target, _MASK_HINT)
    if mask.device != device:
        raise ValueError(f"{name} must be on the query's device {device}; got {mask.device}.")
    return mask


def _check_bias(name: str, bias, target: tuple[int, int, int, int], query: Tensor) -> Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(
            f"{name} must be a floating-point tensor added to the scores; got {got}. "
            "Boolean structure goes in mask=...."
        )
    _check_rank_and_shape(name, bias, target, "Shape it (L, S) or (B|1, H|1, L|1, S), e.g. alibi_bias(...).")
    if bias.device != query.device:
        raise ValueError(f"{name} must be on the query's device {query.device}; got {bias.device}.")
    return bias


def _check_rank_and_shape(name: str, t: Tensor, target: tuple[int, ...], hint: str) -> None:
    if t.ndim == 3:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} is ambiguous: (B, L, S) or (H, L, S)? "
            f"Use {name}.unsqueeze(1) for (B, 1, L, S) or {name}.unsqueeze(0) for (1, H, L, S)."
        )
    if t.ndim > 4:
        raise ValueError(f"{name} must have at most 4 dimensions (B, H, L, S); got {tuple(t.shape)}. {hint}")
    try:
        ok = torch.broadcast_shapes(tuple(t.shape), target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must broadcast to (B, H, L, S) = {target}; got {tuple(t.shape)}. {hint}")
