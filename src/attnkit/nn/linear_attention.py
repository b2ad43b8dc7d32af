"""Multi-head linear attention: "Transformers are RNNs" (Katharopoulos et al. 2020).

The same layer runs two ways. ``forward(x)`` processes a whole sequence in parallel (non-causal, or causal
with chunked prefix sums); ``step(x_t, state)`` processes one token and carries a fixed-size state
``(S, z)``, like an RNN, so generating token t costs the same at every position. With ``causal=True`` the two
give the same outputs.

Paper: https://arxiv.org/abs/2006.16236
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.kernels.linear import LinearState, linear_attention, linear_attention_step

__all__ = ["LinearAttention"]


class LinearAttention(nn.Module):
    """Multi-head linear attention (phi = elu + 1): parallel ``forward``, recurrent ``step``; "Transformers are RNNs".

    out = W_o concat_h( phi(Q_h) S_h / (phi(Q_h) . z_h + eps) ),  Q = x W_q, K = x W_k, V = x W_v,
    S_h = sum_j phi(K_hj) V_hj^T, z_h = sum_j phi(K_hj) (over j <= i when causal).

    Args:
        embed_dim: model width E (input and output).
        num_heads: number of heads H; must divide ``embed_dim``.
        causal: if True, token i attends to tokens j <= i and ``step`` is available.
        bias: add bias terms to the projections.
        eps: normalizer guard (see :func:`attnkit.kernels.linear.linear_attention`).
        chunk_size: chunk length of the causal parallel form.
        device, dtype: passed to the projections.

    Shape:
        forward: x (B, L, E) -> (B, L, E).
        step: x_t (B, E), state ``(S (B, H, D, D), z (B, H, D))`` or None -> (y_t (B, E), new state).

    Raises:
        ValueError if ``num_heads`` does not divide ``embed_dim``, on wrongly shaped inputs, or if ``step`` is
        called on a non-causal layer.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        bias: bool = True,
        eps: float = 1e-6,
        chunk_size: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int; got {val!r}.")
        if embed_dim % num_heads:
            raise ValueError(
                f"num_heads must divide embed_dim; got embed_dim={embed_dim}, num_heads={num_heads}."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.causal = bool(causal)
        self.eps = eps
        self.chunk_size = chunk_size
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def _check(self, x: Tensor, ndim: int, what: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}.")
        if x.ndim != ndim or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape {what} with E={self.embed_dim}; got {tuple(x.shape)}.")

    def forward(self, x: Tensor) -> Tensor:
        """Whole sequence in parallel. x (B, L, E) -> (B, L, E)."""
        self._check(x, 3, "(B, L, E)")
        B, L, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        v = self.v_proj(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        out = linear_attention(q, k, v, causal=self.causal, eps=self.eps, chunk_size=self.chunk_size)
        out = out.transpose(1, 2).reshape(B, L, H * D)  # (B, L, E)
        return self.out_proj(out)

    def step(self, x_t: Tensor, state: LinearState | None = None) -> tuple[Tensor, LinearState]:
        """One token as an RNN: x_t (B, E), state or None -> (y_t (B, E), state). Causal layers only."""
        if not self.causal:
            raise ValueError(
                "step() is the recurrent form of causal linear attention; this layer has causal=False. "
                "Build it with LinearAttention(..., causal=True)."
            )
        self._check(x_t, 2, "(B, E)")
        B = x_t.shape[0]
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(x_t).view(B, H, D)  # (B, H, D)
        k = self.k_proj(x_t).view(B, H, D)  # (B, H, D)
        v = self.v_proj(x_t).view(B, H, D)  # (B, H, D)
        out, state = linear_attention_step(q, k, v, state, eps=self.eps)
        return self.out_proj(out.reshape(B, H * D)), state  # (B, E)
