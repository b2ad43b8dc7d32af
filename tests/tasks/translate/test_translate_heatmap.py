"""attnkit.viz.heatmap: PNGs for one or many heads, written atomically, with clear shape errors."""

from __future__ import annotations

import pytest
import torch

from attnkit.viz.heatmap import save_heatmap


def test_one_and_many_heads(tmp_path):
    w = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), -1)
    p = save_heatmap(w, ["a", "b", "c", "d"], ["x", "y", "z"], tmp_path / "one.png", title="t")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = save_heatmap(torch.stack([w] * 5), ["a", "b", "c", "d"], ["x", "y", "z"], tmp_path / "sub" / "five.png")
    assert p.stat().st_size > 0
    assert sorted(q.name for q in tmp_path.rglob("*") if q.is_file()) == ["five.png", "one.png"]  # no temp left


def test_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"weights must be \(T, S\) = \(2, 3\)"):
        save_heatmap(torch.ones(3, 2), ["a", "b", "c"], ["x", "y"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(T, S\) or \(H, T, S\)"):
        save_heatmap(torch.ones(1, 1, 2, 3), ["a", "b", "c"], ["x", "y"], tmp_path / "x.png")
    with pytest.raises(TypeError, match="weights must be a torch.Tensor"):
        save_heatmap([[1.0]], ["a"], ["x"], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
