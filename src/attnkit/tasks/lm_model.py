"""A tiny character-level causal language model with either linear attention or softmax attention + KV cache.

Both run two ways: ``forward(tokens)`` over a whole sequence (training), and ``step(token, position, state)``
one token at a time (generation). For softmax attention the step keeps a key/value cache and attends over all
``t`` cached keys (cost grows with ``t``); for linear attention the step carries the fixed-size state of
"Transformers are RNNs" (``attnkit.nn.LinearAttention.step``), so every token costs the same.

Letters: ``B`` batch, ``L`` length, ``E`` embedding, ``H`` heads, ``D`` head size, ``V`` vocabulary, ``T`` cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit import masks
from attnkit.functional.positional import sinusoidal_table
from attnkit.nn.linear_attention import LinearAttention
from attnkit.nn.multihead import MultiHeadAttention

ATTENTION_KINDS = ("linear", "softmax")


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, preallocated for ``capacity`` tokens.

    Shape:
        k, v: ``(B, H, capacity, D)``; the first ``length`` positions are filled.
    """

    k: Tensor
    v: Tensor
    length: int = 0


class SoftmaxSelfAttention(nn.Module):
    """Causal multi-head softmax self-attention (:class:`attnkit.nn.MultiHeadAttention`) with a preallocated
    key/value cache for generation: each step projects only the new token (``project_kv``) and attends over the
    cached keys (``forward(kv=...)``).

    ``out = W_o concat_h softmax(Q_h K_h^T / sqrt(D), causal) V_h``.

    Shape:
        forward: x ``(B, L, E)`` -> ``(B, L, E)``; step: x_t ``(B, E)`` -> ``(B, E)``.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.mha = MultiHeadAttention(embed_dim, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, mask=masks.causal())  # (B, L, E)

    def new_cache(self, batch: int, capacity: int, *, dtype=None, device=None) -> KVCache:
        shape = (batch, self.mha.num_kv_heads, capacity, self.mha.head_dim)
        return KVCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def step(self, x_t: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        t = cache.length
        if t >= cache.k.shape[2]:
            raise ValueError(f"KV cache is full ({cache.k.shape[2]} tokens); build it with a larger capacity")
        k, v = self.mha.project_kv(x_t[:, None])  # (B, G, 1, D) each
        cache.k[:, :, t:t + 1] = k
        cache.v[:, :, t:t + 1] = v
        cache.length = t + 1
        # the new token attends to every cached token (all are in its past): no mask needed
        out = self.mha(x_t[:, None], kv=(cache.k[:, :, : t + 1], cache.v[:, :, : t + 1]))  # (B, 1, E)
        return out[:, 0], cache  # (B, E)


class Block(nn.Module):
    """Pre-norm decoder block: ``x + Attn(LN(x))`` then ``x + FFN(LN(x))``."""

    def __init__(self, embed_dim: int, num_heads: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.attn = (LinearAttention(embed_dim, num_heads, causal=True) if kind == "linear"
                     else SoftmaxSelfAttention(embed_dim, num_heads))
        self.ff = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (B, L, E)
        return x + self.ff(self.norm2(x))  # (B, L, E)

    def step(self, x_t: Tensor, state):
        a, state = self.attn.step(self.norm1(x_t), state)  # (B, E)
        x_t = x_t + a
        return x_t + self.ff(self.norm2(x_t)), state  # (B, E)


class CharLM(nn.Module):
    """Character language model: embedding + sinusoidal positions, ``num_layers`` blocks, tied output layer.

    Args:
        vocab_size: ``V``.
        embed_dim, num_heads, num_layers: sizes.
        attention: ``"linear"`` (Katharopoulos et al. 2020) or ``"softmax"`` (with a KV cache when stepping).

    Shape:
        forward: tokens ``(B, L)`` -> logits ``(B, L, V)``; step: token ``(B,)`` -> logits ``(B, V)``.
    """

    def __init__(self, vocab_size: int, *, embed_dim: int = 64, num_heads: int = 4, num_layers: int = 2,
                 attention: str = "linear") -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}; got {attention!r}")
        self.kind, self.embed_dim = attention, embed_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, attention) for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)

    def _logits(self, h: Tensor) -> Tensor:
        return self.norm(h) @ self.embed.weight.T  # (..., V)

    def forward(self, tokens: Tensor) -> Tensor:
        B, L = tokens.shape
        x = self.embed(tokens) + sinusoidal_table(L, self.embed_dim, device=tokens.device)[None]  # (B, L, E)
        for block in self.blocks:
            x = block(x)  # (B, L, E)
        return self._logits(x)  # (B, L, V)

    def init_state(self, batch: int, capacity: int) -> list:
        """Per-layer generation state: ``None`` (linear: created on the first step) or a preallocated KV cache."""
        if self.kind == "linear":
            return [None] * len(self.blocks)
        p = self.embed.weight
        return [b.attn.new_cache(batch, capacity, dtype=p.dtype, device=p.device) for b in self.blocks]

    def step(self, token: Tensor, position: int, state: list) -> tuple[Tensor, list]:
        """Logits for the next token after ``token`` at ``position``, and the updated state."""
        pe = sinusoidal_table(1, self.embed_dim, offset=position, device=token.device)  # (1, E)
        x = self.embed(token) + pe  # (B, E)
        new_state = []
        for block, s in zip(self.blocks, state, strict=True):
            x, s = block.step(x, s)  # (B, E)
            new_state.append(s)
        return self._logits(x), new_state  # (B, V)
