"""S2Attention: spatial-shift MLP with split attention over k branches (S2-MLPv2).

A feature map is expanded to three copies by a linear layer; the first copy is shifted by one pixel in
four directions (one direction per quarter of its channels), the second copy by the transposed pattern, the
third is left as is. Split attention then mixes the three branches with per-channel weights that sum to one
over the branches, and a last linear layer maps back to ``channels``.

Letters: B batch, K branches, H height, W width, C channels, N = H * W pixels.

Paper: Yu et al., "S2-MLPv2: Improved Spatial-Shift MLP Architecture for Vision", 2021,
https://arxiv.org/abs/2108.01072

Unlike the code listing this module was drawn from, nothing here writes into its input, and every channel
count works (the listing hard-codes 512 channels in ``SplitAttention``). The listing's in-place shift
``x[:, 1:] = x[:, :-1]`` reads slices it has already overwritten: in PyTorch 2.x it smears the first row over
the whole map instead of shifting by one pixel; here every shift reads from the untouched input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["spatial_shift1", "spatial_shift2", "SplitAttention", "S2Attention"]


def _check_channels_last(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must be 4-D (B, H, W, C), got shape {tuple(x.shape)}; "
            "permute a (B, C, H, W) map with x.permute(0, 2, 3, 1)"
        )


def _quarters(c: int) -> tuple[slice, slice, slice, slice]:
    # the listing's channel groups: [0, c//4), [c//4, c//2), [c//2, 3c//4), [3c//4, c)
    return (slice(0, c // 4), slice(c // 4, c // 2), slice(c // 2, 3 * c // 4), slice(3 * c // 4, c))


def spatial_shift1(x: Tensor) -> Tensor:
    """Shift each quarter of the channels by one pixel: down, up, right, left (a new tensor).

    ``out[:, h, w, g0] = x[:, h-1, w, g0]`` (down), ``out[:, h, w, g1] = x[:, h+1, w, g1]`` (up),
    ``out[:, h, w, g2] = x[:, h, w-1, g2]`` (right), ``out[:, h, w, g3] = x[:, h, w+1, g3]`` (left), where
    ``g0..g3`` are the channel ranges ``[0, C//4), [C//4, C//2), [C//2, 3C//4), [3C//4, C)``. A pixel on the
    border with no source pixel keeps its own value. The input is not modified.

    Shape:
        x: (B, H, W, C) -> out: (B, H, W, C)
    """
    _check_channels_last(x, "x")
    g0, g1, g2, g3 = _quarters(x.shape[-1])
    out = x.clone()
    out[:, 1:, :, g0] = x[:, :-1, :, g0]  # down:  out[h] = x[h-1]
    out[:, :-1, :, g1] = x[:, 1:, :, g1]  # up:    out[h] = x[h+1]
    out[:, :, 1:, g2] = x[:, :, :-1, g2]  # right: out[w] = x[w-1]
    out[:, :, :-1, g3] = x[:, :, 1:, g3]  # left:  out[w] = x[w+1]
    return out


def spatial_shift2(x: Tensor) -> Tensor:
    """Shift each quarter of the channels by one pixel: right, left, down, up (a new tensor).

    The transposed pattern of :func:`spatial_shift1`: ``g0`` takes ``x[:, h, w-1]``, ``g1`` takes
    ``x[:, h, w+1]``, ``g2`` takes ``x[:, h-1, w]``, ``g3`` takes ``x[:, h+1, w]``; border pixels with no
    source keep their own value. The input is not modified.

    Shape:
        x: (B, H, W, C) -> out: (B, H, W, C)
    """
    _check_channels_last(x, "x")
    g0, g1, g2, g3 = _quarters(x.shape[-1])
    out = x.clone()
    out[:, :, 1:, g0] = x[:, :, :-1, g0]  # right: out[w] = x[w-1]
    out[:, :, :-1, g1] = x[:, :, 1:, g1]  # left:  out[w] = x[w+1]
    out[:, 1:, :, g2] = x[:, :-1, :, g2]  # down:  out[h] = x[h-1]
    out[:, :-1, :, g3] = x[:, 1:, :, g3]  # up:    out[h] = x[h+1]
    return out


class SplitAttention(nn.Module):
    """Mix K branches with per-channel weights that sum to one over the branches.

    ``a = sum_k sum_n X_k[n]`` (a (B, C) summary), ``a_hat = W2 GELU(W1 a)`` reshaped to (B, K, C),
    ``w = softmax_k(a_hat)``, ``out[n] = sum_k w_k * X_k[n]``.

    =========  =================================
    symbol     argument / attribute
    =========  =================================
    K          ``k``
    C          ``channels``
    W1         ``mlp1`` (C -> C, no bias)
    W2         ``mlp2`` (C -> K*C, no bias)
    =========  =================================

    Args:
        channels: number of channels C of every branch.
        k: number of branches K (default 3).

    Shape:
        x: (B, K, *spatial, C), e.g. (B, K, H, W, C) -> out: (B, *spatial, C);
        weights (when ``return_weights``): (B, K, C), summing to one over K.

    Raises:
        ValueError: ``channels`` or ``k`` not positive, or ``x`` not of shape (B, K, ..., C).

    Paper: https://arxiv.org/abs/2108.01072
    """

    def __init__(self, channels: int, k: int = 3, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int (number of branches), got {k!r}")
        self.channels = channels
        self.k = k
        factory = {"device": device, "dtype": dtype}
        self.mlp1 = nn.Linear(channels, channels, bias=False, **factory)
        self.mlp2 = nn.Linear(channels, channels * k, bias=False, **factory)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 3 or x.shape[1] != self.k or x.shape[-1] != self.channels:
            raise ValueError(
                f"x must have shape (B, K, ..., C) with K = k = {self.k} and C = channels = {self.channels}, "
                f"got {tuple(x.shape)}; stack the branches on dim 1"
            )
        b = x.shape[0]
        spatial = x.shape[2:-1]
        xs = x.reshape(b, self.k, -1, self.channels)  # (B, K, N, C)
        # a = sum_k sum_n X_k[n]
        a = xs.sum(dim=(1, 2))  # (B, C)
        # a_hat = W2 GELU(W1 a)
        a_hat = self.mlp2(nn.functional.gelu(self.mlp1(a)))  # (B, K*C)
        a_hat = a_hat.reshape(b, self.k, self.channels)  # (B, K, C)
        # w = softmax over the K branches, per channel
        weights = torch.softmax(a_hat, dim=1)  # (B, K, C)
        # out[n] = sum_k w_k X_k[n]
        out = (weights.unsqueeze(2) * xs).sum(dim=1)  # (B, N, C)
        out = out.reshape(b, *spatial, self.channels)  # (B, *spatial, C)
        if return_weights:
            return out, weights
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, k={self.k}"


class S2Attention(nn.Module):
    """Spatial-shift MLP block with split attention (S2-MLPv2's S2Attention).

    ``[X1 | X2 | X3] = X W_in + b_in`` (C -> 3C), ``X1 <- shift1(X1)``, ``X2 <- shift2(X2)``,
    ``A = SplitAttention([X1, X2, X3])``, ``out = A W_out + b_out`` (C -> C).

    Args:
        channels: channel count C (any positive int).
        channels_last: if False (default) inputs and outputs are (B, C, H, W), as the listing; if True they
            are (B, H, W, C).

    Shape:
        x: (B, C, H, W) -> out: (B, C, H, W)   (``channels_last=False``)
        x: (B, H, W, C) -> out: (B, H, W, C)   (``channels_last=True``)

    Raises:
        ValueError: ``channels`` not positive, or ``x`` not 4-D with C channels where the layout says.

    Paper: https://arxiv.org/abs/2108.01072
    """

    def __init__(self, channels: int, *, channels_last: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.channels_last = bool(channels_last)
        factory = {"device": device, "dtype": dtype}
        self.mlp1 = nn.Linear(channels, 3 * channels, **factory)
        self.mlp2 = nn.Linear(channels, channels, **factory)
        self.split_attention = SplitAttention(channels, k=3, **factory)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        c = self.channels
        layout = "(B, H, W, C)" if self.channels_last else "(B, C, H, W)"
        c_dim = 3 if self.channels_last else 1
        if x.dim() != 4 or x.shape[c_dim] != c:
            raise ValueError(
                f"x must be {layout} with C = channels = {c}, got shape {tuple(x.shape)}; "
                "set channels_last to match your layout"
            )
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.mlp1(x)  # (B, H, W, 3C)
        x1 = spatial_shift1(x[..., :c])  # (B, H, W, C)
        x2 = spatial_shift2(x[..., c : 2 * c])  # (B, H, W, C)
        x3 = x[..., 2 * c :]  # (B, H, W, C)
        x_all = torch.stack([x1, x2, x3], dim=1)  # (B, 3, H, W, C)
        a = self.split_attention(x_all)  # (B, H, W, C)
        out = self.mlp2(a)  # (B, H, W, C)
        if not self.channels_last:
            out = out.permute(0, 3, 1, 2)  # (B, C, H, W)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channels_last={self.channels_last}"
