"""Models and data for the vision recipe: the 8x8 digits, a small CNN, and the three contenders.

Letters: ``B`` batch, ``E`` embedding, ``P`` patches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.nn.vit import ViT, neighbourhood_mask

MODELS = ("vit", "local", "cnn")


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (GELU), a 2x2 max-pool after the second, global average pool, linear classifier.

    Shape:
        images ``(B, 1, 8, 8)`` -> logits ``(B, num_classes)``
    """

    def __init__(self, num_classes: int = 10, *, width: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.GELU(),  # (B, w, 8, 8)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # (B, 2w, 4, 4)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),  # (B, 2w, 4, 4)
        )
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))  # (B, num_classes)


def build(name: str, *, embed_dim: int, depth: int, heads: int, patch_size: int, k: int, cnn_width: int,
          dropout: float = 0.0, pos_embedding: str = "learned") -> nn.Module:
    """One of ``MODELS`` for 8x8 one-channel images and 10 classes."""
    if name == "cnn":
        return SmallCNN(10, width=cnn_width)
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}; got {name!r}")
    grid = 8 // patch_size
    mask = neighbourhood_mask(grid, grid, k) if name == "local" else None
    return ViT(8, patch_size, 10, embed_dim=embed_dim, depth=depth, num_heads=heads, ff_dim=2 * embed_dim,
               dropout=dropout, pos_embedding=pos_embedding, attn_mask=mask)


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package), a stratified train/test split.

    Pixels (0..16) are scaled to [0, 1]. The split is fixed by ``seed`` (default 0) for every run.

    Shape:
        returns x_train ``(N, 1, 8, 8)``, y_train ``(N,)``, x_test ``(M, 1, 8, 8)``, y_test ``(M,)``
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)  # (1797,)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def stratified_subset(y: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices of ``n`` examples drawn without replacement, classes as balanced as ``n`` allows.

    Shape:
        returns ``(n,)``
    """
    if n >= len(y):
        return torch.randperm(len(y), generator=generator)
    classes = y.unique()
    per_class = [torch.nonzero(y == c).flatten() for c in classes]
    per_class = [p[torch.randperm(len(p), generator=generator)] for p in per_class]
    picked, i = [], 0
    while len(picked) < n:  # round-robin over classes
        for p in per_class:
            if i < len(p) and len(picked) < n:
                picked.append(int(p[i]))
        i += 1
    return torch.tensor(picked)[torch.randperm(n, generator=generator)]


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels in each direction, zero fill.

    Shape:
        x ``(B, C, H, W)`` -> same
    """
    B, _, H, W = x.shape
    s = max_shift
    padded = nn.functional.pad(x, (s, s, s, s))  # (B, C, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * s + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
    b = torch.arange(B)[:, None, None]
    return padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
