"""The speech recipe's model: a small Transformer encoder over log-mel frames, full or truncated attention.

Truncated self-attention (seed 000: "Truncated Self-attention" for long speech): frame ``i`` attends only to
frames ``i - W .. i + W`` (``attnkit.masks.window(W, W)``, inclusive), instead of all ``L`` frames.

Two ways to run the truncated case, same result:

- ``impl="blocked"``: :func:`band_attention` cuts the frames into blocks of ``b`` queries and scores each
  block only against the ``b + 2W`` keys its band reaches: ``L * (b + 2W)`` scores instead of ``L * L``.
- ``impl="mask"``: one call ``attention(q, k, v, mask=window(W, W) & padding(lengths))``; this is as fast as
  the kernel ``backend="auto"`` picks for a window mask (a dense path pays for all ``L * L`` pairs).

Letters: ``B`` batch, ``H`` heads, ``L`` frames, ``D`` head size, ``E`` model size, ``b`` block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit import masks
from attnkit.functional import attention
from attnkit.functional.positional import sinusoidal_table


def band_attention(q: Tensor, k: Tensor, v: Tensor, *, left: int, right: int, lengths: Tensor | None = None,
                   block: int | None = None, backend: str = "auto") -> Tensor:
    """Self-attention restricted to the band ``i - left <= j <= i + right`` (and ``j < lengths``), by blocks.

    For every valid query (``i < lengths``) this equals
    ``attention(q, k, v, mask=masks.window(left, right) & masks.padding(lengths))``; the rows of padded queries
    (``i >= lengths``) are not meant to be used (they attend within their band, padding included). Each block of
    ``block`` queries is scored only against the keys its band can reach (``block + left + right`` of them), so
    the work is ``O(L * (block + left + right))`` and no ``L x L`` tensor (scores or mask) is ever built.

    Shape:
        q, k, v: ``(B, H, L, D)``; lengths: ``(B,)`` valid frames; returns ``(B, H, L, D)``.
    """
    B, H, L, D = q.shape
    b = max(2 * (left + right), 16) if block is None else block
    if b < 1:
        raise ValueError(f"block must be >= 1; got {b}")
    # Block outputs land in (B, L, H, Dv) order, so merging the heads afterwards is a free view. Under autograd
    # they are concatenated (cheap backward); otherwise written into one buffer.
    track = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    pieces = []
    out = None if track else q.new_empty(B, L, H, v.shape[-1])  # (B, L, H, Dv)
    for start in range(0, L, b):
        stop = min(start + b, L)
        k0, k1 = max(start - left, 0), min(stop + right, L)  # keys any query of the block may see
        i = torch.arange(start, stop, device=q.device)  # (b,) query frames
        j = torch.arange(k0, k1, device=q.device)  # (kb,) key frames
        band = (j[None, :] >= i[:, None] - left) & (j[None, :] <= i[:, None] + right)  # (b, kb)
        if lengths is not None:
            n = lengths.to(q.device)[:, None, None]  # (B, 1, 1)
            # a valid query sees valid keys only; a padded query (i >= n, output discarded) keeps its whole band,
            # so no row is empty and no zero-fill copy is needed
            band = (band[None] & ((j[None, None, :] < n) | (i[None, :, None] >= n)))[:, None]  # (B, 1, b, kb)
        piece = attention(q[:, :, start:stop], k[:, :, k0:k1], v[:, :, k0:k1], mask=band,
                          backend=backend).transpose(1, 2)  # (B, b, H, Dv)
        if track:
            pieces.append(piece)
        else:
            out[:, start:stop] = piece
    out = torch.cat(pieces, dim=1) if track else out  # (B, L, H, Dv)
    return out.transpose(1, 2)  # (B, H, L, Dv), a view


class SpeechEncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer whose self-attention is full (``window=0``) or truncated to ``±window``.

    ``x = x + Wo · attn(LN(x)); x = x + FFN(LN(x))``.

    Shape:
        x: ``(B, L, E)``, lengths: ``(B,)`` -> ``(B, L, E)``
    """

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, dropout: float, *, window: int = 0,
                 impl: str = "blocked") -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads; got {embed_dim} and {num_heads}")
        if impl not in ("blocked", "mask"):
            raise ValueError(f"impl must be 'blocked' or 'mask'; got {impl!r}")
        self.num_heads, self.window, self.impl = num_heads, window, impl
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.ff = nn.Sequential(nn.Linear(embed_dim, ff_dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_dim, embed_dim))
        self.dropout = nn.Dropout(dropout)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
        """Attention of ``(B, H, L, D)`` heads under this layer's mask."""
        W = self.window
        if W <= 0:
            return attention(q, k, v, mask=masks.padding(lengths))  # (B, H, L, D)
        if self.impl == "blocked":
            return band_attention(q, k, v, left=W, right=W, lengths=lengths)  # (B, H, L, D)
        return attention(q, k, v, mask=masks.window(W, W) & masks.padding(lengths))  # (B, H, L, D)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        B, L, E = x.shape
        H = self.num_heads
        # Q, K, V = LN(x) W^q, LN(x) W^k, LN(x) W^v
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)
        heads = self.attend(q, k, v, lengths)  # (B, H, L, D)
        x = x + self.dropout(self.out_proj(heads.transpose(1, 2).reshape(B, L, E)))  # (B, L, E)
        return x + self.dropout(self.ff(self.norm2(x)))  # (B, L, E)


class SpeechTransformer(nn.Module):
    """Log-mel frames -> linear embedding + sinusoidal positions -> encoder layers -> masked mean -> classes.

    Args:
        n_mels: features per frame.
        num_classes: output classes (10 digits).
        embed_dim, num_heads, num_layers, ff_dim, dropout: encoder sizes.
        window: ``0`` for full attention, else each frame sees ``±window`` frames.
        impl: ``"blocked"`` or ``"mask"`` (see the module docstring).

    Shape:
        feats: ``(B, L, n_mels)``, lengths: ``(B,)`` -> logits ``(B, num_classes)``
    """

    def __init__(self, n_mels: int, num_classes: int = 10, *, embed_dim: int = 64, num_heads: int = 4,
                 num_layers: int = 3, ff_dim: int = 128, dropout: float = 0.1, window: int = 0,
                 impl: str = "blocked") -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.embed = nn.Linear(n_mels, embed_dim)
        self.layers = nn.ModuleList(
            SpeechEncoderLayer(embed_dim, num_heads, ff_dim, dropout, window=window, impl=impl)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, feats: Tensor, lengths: Tensor) -> Tensor:
        B, L, _ = feats.shape
        pe = sinusoidal_table(L, self.embed_dim, dtype=feats.dtype, device=feats.device)  # (L, E)
        x = self.embed(feats) + pe[None]  # (B, L, E)
        for layer in self.layers:
            x = layer(x, lengths)  # (B, L, E)
        valid = (torch.arange(L, device=feats.device)[None, :] < lengths[:, None]).to(x.dtype)  # (B, L)
        pooled = (self.norm(x) * valid[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(x.dtype)  # (B, E)
        return self.head(pooled)  # (B, num_classes)
