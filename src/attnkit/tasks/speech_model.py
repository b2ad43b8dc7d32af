"""The speech recipe's model: a small Transformer encoder over log-mel frames, full or truncated attention.

Truncated self-attention (seed 000: "Truncated Self-attention" for long speech): frame ``i`` attends only to
frames ``i - W .. i + W`` (``attnkit.masks.window(W, W)``, inclusive), instead of all ``L`` frames.

The attention is one library call, ``attention(q, k, v, mask=window(W, W) & padding(lengths))``: the mask says
which frames each frame may see, and ``backend="auto"`` picks the kernel from it (SDPA at the recordings' few
hundred frames, the block-sparse kernel from 512 x 512 pairs on, which computes only the band's tiles).

Letters: ``B`` batch, ``H`` heads, ``L`` frames, ``D`` head size, ``E`` model size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit import masks
from attnkit.functional import attention
from attnkit.functional.positional import sinusoidal_table


class SpeechEncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer whose self-attention is full (``window=0``) or truncated to ``±window``.

    ``x = x + Wo · attn(LN(x)); x = x + FFN(LN(x))``.

    Shape:
        x: ``(B, L, E)``, lengths: ``(B,)`` -> ``(B, L, E)``
    """

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, dropout: float, *, window: int = 0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads; got {embed_dim} and {num_heads}")
        self.num_heads, self.window = num_heads, window
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.ff = nn.Sequential(nn.Linear(embed_dim, ff_dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_dim, embed_dim))
        self.dropout = nn.Dropout(dropout)

    def mask(self, lengths: Tensor) -> masks.Mask:
        """This layer's mask: key padding, and the band ``±window`` when truncated. Build it once per batch and
        pass it to every layer: the mask remembers what it derives (its dense form for SDPA, its tiles)."""
        W = self.window
        return masks.padding(lengths) if W <= 0 else masks.window(W, W) & masks.padding(lengths)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, mask: masks.Mask | None = None) -> Tensor:
        """Attention of ``(B, H, L, D)`` heads under this layer's mask."""
        return attention(q, k, v, mask=self.mask(lengths) if mask is None else mask)  # (B, H, L, D)

    def forward(self, x: Tensor, lengths: Tensor, mask: masks.Mask | None = None) -> Tensor:
        B, L, E = x.shape
        H = self.num_heads
        # Q, K, V = LN(x) W^q, LN(x) W^k, LN(x) W^v
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)
        heads = self.attend(q, k, v, lengths, mask)  # (B, H, L, D)
        x = x + self.dropout(self.out_proj(heads.transpose(1, 2).reshape(B, L, E)))  # (B, L, E)
        return x + self.dropout(self.ff(self.norm2(x)))  # (B, L, E)


class SpeechTransformer(nn.Module):
    """Log-mel frames -> linear embedding + sinusoidal positions -> encoder layers -> masked mean -> classes.

    Args:
        n_mels: features per frame.
        num_classes: output classes (10 digits).
        embed_dim, num_heads, num_layers, ff_dim, dropout: encoder sizes.
        window: ``0`` for full attention, else each frame sees ``±window`` frames.

    Shape:
        feats: ``(B, L, n_mels)``, lengths: ``(B,)`` -> logits ``(B, num_classes)``
    """

    def __init__(self, n_mels: int, num_classes: int = 10, *, embed_dim: int = 64, num_heads: int = 4,
                 num_layers: int = 3, ff_dim: int = 128, dropout: float = 0.1, window: int = 0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.embed = nn.Linear(n_mels, embed_dim)
        self.layers = nn.ModuleList(
            SpeechEncoderLayer(embed_dim, num_heads, ff_dim, dropout, window=window)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, feats: Tensor, lengths: Tensor) -> Tensor:
        B, L, _ = feats.shape
        pe = sinusoidal_table(L, self.embed_dim, dtype=feats.dtype, device=feats.device)  # (L, E)
        x = self.embed(feats) + pe[None]  # (B, L, E)
        mask = self.layers[0].mask(lengths) if len(self.layers) else None  # one mask object for every layer
        for layer in self.layers:
            x = layer(x, lengths, mask)  # (B, L, E)
        valid = (torch.arange(L, device=feats.device)[None, :] < lengths[:, None]).to(x.dtype)  # (B, L)
        pooled = (self.norm(x) * valid[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(x.dtype)  # (B, E)
        return self.head(pooled)  # (B, num_classes)
