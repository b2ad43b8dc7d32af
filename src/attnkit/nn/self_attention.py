"""Single-head self-attention with its three projection matrices, as in the course notes (seed 000/002).

Letters: ``B`` batch (any leading dims), ``L`` sequence length, ``E`` embed_dim, ``D_k`` kdim, ``D_v`` vdim.

    Q = I W_q,   K = I W_k,   V = I W_v
    A' = normalize(score(Q, K))          (B, L, L)
    O = A' V                             (B, L, D_v)

Query, key and value get *different* projections so that "what I look for" (query), "what I offer to be
matched on" (key) and "what I hand over" (value) can differ; with one shared matrix the scores would be
symmetric (``q_i . k_j = q_j . k_i``) and every token would match itself best.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from attnkit._checks import check_int
from attnkit.functional.attention import attention
from attnkit.functional.scores import scaled_dot
from attnkit.masks import Mask

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Self-attention of a token set with itself: ``softmax(score(x W_q, x W_k)) x W_v``.

    With the default ``score`` (scaled dot product): ``O = softmax(Q K^T / sqrt(D_k)) V``.

    ============  ==========================
    symbol        argument / attribute
    ============  ==========================
    ``I``         ``x``
    ``W_q``       ``W_q`` (E -> kdim)
    ``W_k``       ``W_k`` (E -> kdim)
    ``W_v``       ``W_v`` (E -> vdim)
    ``D_k, D_v``  ``kdim``, ``vdim``
    ============  ==========================

    Args:
        embed_dim: size ``E`` of the input tokens.
        kdim: size ``D_k`` of queries and keys (default ``embed_dim``).
        vdim: size ``D_v`` of values, and so of the output (default ``embed_dim``).
        bias: give the three projections additive biases.
        score: ``score(q, k) -> (..., L, L)`` from :mod:`attnkit.functional.scores` (default ``scaled_dot``);
            an ``nn.Module`` score (with its own parameters) is registered as a sub-module.
        device, dtype: passed to the parameters.

    Shape:
        x ``(..., L, E)`` -> out ``(..., L, D_v)``; weights ``(..., L, L)``.

    Paper: https://arxiv.org/abs/1706.03762 (section 3.2.1)
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = False,
        score: Callable[[Tensor, Tensor], Tensor] = scaled_dot,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim, minimum=1)
        kdim = embed_dim if kdim is None else check_int("kdim", kdim, minimum=1)
        vdim = embed_dim if vdim is None else check_int("vdim", vdim, minimum=1)
        if not callable(score):
            raise TypeError(
                f"score must be a callable score(q, k) -> (..., L, S); got {type(score).__name__}. "
                "See attnkit.functional.scores."
            )
        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        factory = {"device": device, "dtype": dtype}
        self.W_q = nn.Linear(embed_dim, kdim, bias=bias, **factory)
        self.W_k = nn.Linear(embed_dim, kdim, bias=bias, **factory)
        self.W_v = nn.Linear(embed_dim, vdim, bias=bias, **factory)
        self.score = score

    def extra_repr(self) -> str:
        name = getattr(self.score, "__name__", type(self.score).__name__)
        return f"embed_dim={self.embed_dim}, kdim={self.kdim}, vdim={self.vdim}, score={name}"

    def forward(
        self, x: Tensor, *, mask: Mask | Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from every token of ``x`` to every (allowed) token of ``x``.

        Args:
            x: tokens ``(..., L, E)``.
            mask: True = may attend; a :class:`attnkit.masks.Mask` or a bool tensor broadcastable to
                ``(..., L, L)``.
            return_weights: also return the weights ``A'``.

        Returns:
            ``out``, or ``(out, weights)``.

        Shape:
            ``(..., L, E)`` -> ``(..., L, D_v)``; weights ``(..., L, L)``.

        Raises:
            TypeError / ValueError: ``x`` not a floating tensor ``(..., L, E)`` with ``E = embed_dim``.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point tensor (..., L, E); got {got}.")
        if x.ndim < 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x must have shape (..., L, E) with E = embed_dim = {self.embed_dim}; got {tuple(x.shape)}."
            )
        # Q = I W_q, K = I W_k, V = I W_v
        q = self.W_q(x)  # (..., L, D_k)
        k = self.W_k(x)  # (..., L, D_k)
        v = self.W_v(x)  # (..., L, D_v)
        # O = normalize(score(Q, K)) V
        return attention(q, k, v, score=self.score, mask=mask, return_weights=return_weights)
