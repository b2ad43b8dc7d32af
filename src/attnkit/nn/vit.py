"""Vision Transformer pieces: patch embedding, 2-D positions, a k x k local attention mask, and a small ViT.

An image is cut into ``p x p`` patches, each projected to a token (``PatchEmbedding``); a learned class token is
prepended; 2-D positions are added; Transformer encoder layers mix the tokens; the class token's final state is
classified (Dosovitskiy et al., 2021, https://arxiv.org/abs/2010.11929).

``neighbourhood_mask`` restricts attention to a ``k x k`` neighbourhood of patches: one layer then sees what a
``k x k`` convolution sees (seed 000: "CNN is self-attention restricted to a receptive field").

Letters: ``B`` batch, ``C`` channels, ``E`` embedding, ``gh x gw`` patch grid, ``P = gh gw`` patches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit import masks
from attnkit.functional.positional import sinusoidal_table
from attnkit.nn.transformer import TransformerEncoderLayer

__all__ = ["PatchEmbedding", "ViT", "neighbourhood_mask", "sinusoidal_2d"]


def _check_pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return value


class PatchEmbedding(nn.Module):
    """Cut images into non-overlapping ``patch_size`` squares and project each to ``embed_dim`` (row-major order).

    ``token_(r, c) = W · vec(image[:, r p:(r+1) p, c p:(c+1) p]) + b``, computed as a strided convolution.

    Args:
        in_channels: ``C``.
        patch_size: ``p``; image height and width must be multiples of it.
        embed_dim: ``E``.

    Shape:
        images ``(B, C, H, W)`` -> tokens ``(B, (H/p)(W/p), E)``

    Raises:
        ValueError: an image that is not 4-D with ``C`` channels and sides divisible by ``p``.
    """

    def __init__(self, in_channels: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.in_channels = _check_pos_int("in_channels", in_channels)
        self.patch_size = _check_pos_int("patch_size", patch_size)
        self.embed_dim = _check_pos_int("embed_dim", embed_dim)
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        p = self.patch_size
        if images.dim() != 4 or images.shape[1] != self.in_channels or images.shape[2] % p or images.shape[3] % p:
            raise ValueError(
                f"images must be (B, {self.in_channels}, H, W) with H and W multiples of patch_size={p}; "
                f"got {tuple(images.shape)}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, P, E)


def sinusoidal_2d(grid_h: int, grid_w: int, embed_dim: int) -> Tensor:
    """2-D sinusoidal positions: the first ``E/2`` features encode the row, the last ``E/2`` the column.

    Shape:
        returns ``(grid_h * grid_w, E)`` in row-major patch order.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for 2-D sinusoidal positions; got {embed_dim}")
    rows = sinusoidal_table(grid_h, embed_dim // 2)  # (gh, E/2)
    cols = sinusoidal_table(grid_w, embed_dim // 2)  # (gw, E/2)
    return torch.cat([rows[:, None].expand(-1, grid_w, -1), cols[None].expand(grid_h, -1, -1)],
                     dim=-1).reshape(grid_h * grid_w, embed_dim)  # (P, E)


def neighbourhood_mask(grid_h: int, grid_w: int, k: int, *, cls_token: bool = True) -> Tensor:
    """Boolean attention mask (True = may attend) that keeps a ``k x k`` neighbourhood of every patch.

    Patch ``(r, c)`` may attend to patch ``(r', c')`` iff ``|r - r'| <= k // 2`` and ``|c - c'| <= k // 2``
    (``k`` odd): the receptive field of one ``k x k`` convolution with ``'same'`` padding. With ``cls_token``
    the class token (index 0) attends to every token and no patch attends to it, so patch tokens stay local
    layer after layer (as a CNN's features) and the class token plays global pooling.

    Shape:
        returns ``(1 + P, 1 + P)`` with ``cls_token``, else ``(P, P)``; ``P = grid_h * grid_w``, row-major.

    Raises:
        ValueError: ``k`` not a positive odd int, or a grid side < 1.
    """
    _check_pos_int("grid_h", grid_h)
    _check_pos_int("grid_w", grid_w)
    _check_pos_int("k", k)
    if k % 2 == 0:
        raise ValueError(f"k must be odd (a centred k x k neighbourhood); got {k}")
    P = grid_h * grid_w
    # |r - r'| <= k // 2 and |c - c'| <= k // 2: the library's 2-D neighbourhood, truncated at the borders
    local = masks.neighborhood(grid_h, grid_w, k, shift=False).materialize(P, P)  # (P, P)
    if not cls_token:
        return local
    mask = torch.zeros(P + 1, P + 1, dtype=torch.bool)
    mask[0, :] = True  # the class token reads every token
    mask[1:, 1:] = local  # patches read their neighbourhood only
    return mask  # (1 + P, 1 + P)


class ViT(nn.Module):
    """A small Vision Transformer: patches -> tokens (+ class token, + 2-D positions) -> encoder -> class logits.

    Args:
        image_size: side of the (square) input images.
        patch_size: side of a patch; divides ``image_size``.
        num_classes: output classes.
        in_channels: image channels.
        embed_dim, depth, num_heads, ff_dim, dropout: encoder sizes (``attnkit.nn.TransformerEncoderLayer``,
            pre-norm).
        pos_embedding: ``"learned"`` (a parameter per token) or ``"sinusoidal"`` (fixed 2-D table,
            :func:`sinusoidal_2d`, plus a learned vector for the class token).
        attn_mask: optional boolean ``(1 + P, 1 + P)`` mask used in every layer (e.g.
            :func:`neighbourhood_mask`); ``None`` = full attention.

    Shape:
        images ``(B, C, H, W)`` -> logits ``(B, num_classes)``; with ``need_weights`` also a list of per-layer
        weights ``(B, heads, 1 + P, 1 + P)``.
    """

    def __init__(self, image_size: int, patch_size: int, num_classes: int, *, in_channels: int = 1,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, ff_dim: int | None = None,
                 dropout: float = 0.0, pos_embedding: str = "learned", attn_mask: Tensor | None = None) -> None:
        super().__init__()
        _check_pos_int("image_size", image_size)
        _check_pos_int("patch_size", patch_size)
        _check_pos_int("num_classes", num_classes)
        _check_pos_int("depth", depth)
        if image_size % patch_size:
            raise ValueError(f"patch_size must divide image_size; got {patch_size} and {image_size}")
        self.grid = image_size // patch_size
        P = self.grid * self.grid
        self.patch_embed = PatchEmbedding(in_channels, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embedding == "learned":
            self.pos = nn.Parameter(torch.randn(1, 1 + P, embed_dim) * 0.02)
        elif pos_embedding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_2d(self.grid, self.grid, embed_dim)[None], persistent=False)
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            raise ValueError(f"pos_embedding must be 'learned' or 'sinusoidal'; got {pos_embedding!r}")
        self.pos_embedding = pos_embedding
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (1 + P, 1 + P):
                raise ValueError(f"attn_mask must be a bool tensor of shape (1 + P, 1 + P) = ({1 + P}, {1 + P}); "
                                 f"got {attn_mask.dtype} {tuple(attn_mask.shape)}")
            self.register_buffer("attn_mask", attn_mask.clone(), persistent=False)
        else:
            self.attn_mask = None
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(embed_dim, num_heads, ff_dim, dropout, norm_first=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def positions(self) -> Tensor:
        """Position vectors of the class token and the patches. Shape: ``(1, 1 + P, E)``."""
        if self.pos_embedding == "learned":
            return self.pos
        return torch.cat([self.cls_pos, self.pos_table], dim=1)  # (1, 1 + P, E)

    def forward(self, images: Tensor, *, need_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        x = self.patch_embed(images)  # (B, P, E)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + P, E)
        x = self.dropout(x + self.positions())  # (B, 1 + P, E)
        weights = []
        for layer in self.layers:
            if need_weights:
                x, w = layer(x, mask=self.attn_mask, need_weights=True)  # (B, 1 + P, E), (B, H, 1+P, 1+P)
                weights.append(w)
            else:
                x = layer(x, mask=self.attn_mask)  # (B, 1 + P, E)
        logits = self.head(self.norm(x[:, 0]))  # (B, num_classes)
        return (logits, weights) if need_weights else logits
