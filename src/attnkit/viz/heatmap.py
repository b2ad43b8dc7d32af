"""Heatmaps of attention weights: source words on the x axis, output words on the y axis.

matplotlib is imported inside the functions, with the non-interactive Agg backend, so importing this
module costs nothing and it works on machines without a display. Files are written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from attnkit._io import save_figure_atomic


def _check(weights: torch.Tensor, src_tokens: list[str], out_tokens: list[str]) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    w = weights.detach().float().cpu()
    if w.dim() == 2:
        w = w[None]  # (1, T, S)
    if w.dim() != 3:
        raise ValueError(f"weights must be (T, S) or (H, T, S), got shape {tuple(weights.shape)}")
    if w.shape[1:] != (len(out_tokens), len(src_tokens)):
        raise ValueError(f"weights must be (T, S) = ({len(out_tokens)}, {len(src_tokens)}) to match "
                         f"out_tokens and src_tokens, got {tuple(weights.shape)}")
    return w  # (H, T, S)


def save_heatmap(weights: torch.Tensor, src_tokens: list[str], out_tokens: list[str], path: str | Path, *,
                 title: str | None = None, head_titles: list[str] | None = None) -> Path:
    """Draw attention weights as a heatmap (one panel per head) and save it as a PNG at ``path``.

    Args:
        weights: ``(T, S)`` or ``(H, T, S)``: row t = output word t, column j = source word j.
        src_tokens: the S source words (x axis); out_tokens: the T output words (y axis).
        path: where the PNG goes (written to a temporary file in the same folder, then renamed).
        title: figure title; head_titles: one title per panel (default "head h").

    Returns:
        the path written.

    Shape:
        - weights: ``(T, S)`` or ``(H, T, S)``
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    w = _check(weights, src_tokens, out_tokens)  # (H, T, S)
    H, T, S = w.shape
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    cell = 0.45
    fig = Figure(figsize=(max(4.0, cols * (1.2 + cell * S)), max(2.5, rows * (1.0 + cell * T))))
    axes = fig.subplots(rows, cols, squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(S), src_tokens, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(T), out_tokens, fontsize=8)
        if H > 1:
            ax.set_title(head_titles[h] if head_titles else f"head {h}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    save_figure_atomic(fig, path, dpi=100)
    return path
