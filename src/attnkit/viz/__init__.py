"""Pictures of attention: PNG heatmaps (:mod:`attnkit.viz.heatmap`, matplotlib) and the interactive HTML explorer
(:mod:`attnkit.viz.explorer`). Both are imported on first use, so ``import attnkit.viz`` costs nothing."""

from __future__ import annotations

_LAZY = {"Explorer": "explorer", "explore": "explorer", "write_explorer": "explorer", "save_heatmap": "heatmap"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"attnkit.viz.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'attnkit.viz' has no attribute {name!r}")
