"""Vision recipe: patch embedding against explicit patch cutting, the k x k neighbourhood mask against its
definition, locality of the masked ViT through gradients, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.nn.vit import PatchEmbedding, ViT, neighbourhood_mask, sinusoidal_2d
from attnkit.tasks.vision_models import SmallCNN, random_shift, stratified_subset


def test_patch_embedding_is_a_linear_map_of_each_flattened_patch(gen):
    pe = PatchEmbedding(3, 2, 5)
    x = torch.randn(2, 3, 4, 6, generator=gen)
    got = pe(x)
    assert got.shape == (2, 6, 5)
    W = pe.proj.weight.reshape(5, -1).double()  # (E, C p p)
    for b in range(2):
        for r in range(2):
            for c in range(3):
                patch = x[b, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1).double()  # (C p p,)
                want = W @ patch + pe.proj.bias.double()
                torch.testing.assert_close(got[b, r * 3 + c].double(), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        pe(torch.randn(1, 3, 5, 6))


@pytest.mark.parametrize("gh,gw,k", [(4, 4, 3), (8, 8, 3), (5, 3, 5), (3, 3, 1)])
def test_neighbourhood_mask_matches_definition(gh, gw, k):
    m = neighbourhood_mask(gh, gw, k)
    P = gh * gw
    assert m.shape == (1 + P, 1 + P) and m.dtype == torch.bool
    assert m[0].all() and not m[1:, 0].any()  # class token reads all; patches do not read it
    for i in range(P):
        for j in range(P):
            ri, ci, rj, cj = i // gw, i % gw, j // gw, j % gw
            assert bool(m[1 + i, 1 + j]) == (abs(ri - rj) <= k // 2 and abs(ci - cj) <= k // 2)
    # an interior patch sees exactly k*k patches (a k x k conv's receptive field)
    if gh > k and gw > k:
        centre = (gh // 2) * gw + gw // 2
        assert int(m[1 + centre].sum()) == k * k
    assert neighbourhood_mask(gh, gw, k, cls_token=False).shape == (P, P)


def test_neighbourhood_mask_rejects_even_k():
    with pytest.raises(ValueError, match="odd"):
        neighbourhood_mask(4, 4, 2)


def test_local_vit_receptive_field_grows_like_a_cnn():
    """Depth-d local ViT: a patch's output depends only on patches within d*(k//2) rows/cols (through grads)."""
    torch.manual_seed(0)
    for depth in (1, 2):
        model = ViT(8, 1, 10, embed_dim=16, depth=depth, num_heads=2, attn_mask=neighbourhood_mask(8, 8, 3))
        x = torch.randn(1, 1, 8, 8, requires_grad=True)
        h = model.patch_embed(x)
        h = torch.cat([model.cls_token, h], 1) + model.positions()
        for layer in model.layers:
            h = layer(h, mask=model.attn_mask)
        (g,) = torch.autograd.grad(h[0, 1 + 3 * 8 + 3].sum(), x)  # patch (3, 3)
        rows, cols = torch.nonzero(g[0, 0].abs() > 0, as_tuple=True)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3 - depth, 3 + depth, 3 - depth, 3 + depth)


def test_full_vit_mixes_everything_and_shapes():
    torch.manual_seed(0)
    model = ViT(8, 2, 10, embed_dim=16, depth=1, num_heads=2, pos_embedding="sinusoidal")
    logits, weights = model(torch.randn(3, 1, 8, 8), need_weights=True)
    assert logits.shape == (3, 10) and weights[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(3, 2, 17))


def test_sinusoidal_2d_rows_and_columns():
    t = sinusoidal_2d(3, 4, 8)
    assert t.shape == (12, 8)
    # first half depends on the row only, second half on the column only
    torch.testing.assert_close(t[0, :4], t[3, :4])
    torch.testing.assert_close(t[0, 4:], t[4, 4:])
    assert not torch.equal(t[0, :4], t[4, :4])
    torch.testing.assert_close(t[5, :4], torch.tensor([0.8414710, 0.5403023, 0.0099998, 0.99995]), atol=1e-5,
                               rtol=0)  # row 1: sin(1), cos(1), sin(1/100), cos(1/100)


def test_random_shift_moves_pixels_by_at_most_one(gen):
    x = torch.zeros(50, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    y = random_shift(x, gen)
    pos = torch.nonzero(y[:, 0] > 0)[:, 1:]
    assert len(pos) == 50 and ((pos - 4).abs() <= 1).all() and len({tuple(p.tolist()) for p in pos}) > 3


def test_stratified_subset_balances_classes(gen):
    y = torch.arange(10).repeat(30)
    idx = stratified_subset(y, 100, gen)
    assert len(set(idx.tolist())) == 100
    assert torch.bincount(y[idx], minlength=10).tolist() == [10] * 10


def test_cnn_shape():
    assert SmallCNN(10, width=8)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_tiny_run(tmp_path):
    from attnkit.cli import main

    assert main(["vision", "--quick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["table"]) == {"vit", "local", "cnn"}
    assert metrics["train_images"] + metrics["test_images"] == 1797
    for row in metrics["table"].values():
        for cell in row.values():
            assert 0.0 <= cell["mean"] <= 1.0
    assert (tmp_path / "accuracy_vs_data.png").stat().st_size > 0
    assert (tmp_path / "local_mask.png").stat().st_size > 0


def test_bad_sizes_give_a_one_line_error(tmp_path, capsys):
    from attnkit.cli import main

    for bad in ("5,x", "100,lots", "5"):
        with pytest.raises(SystemExit) as exc:
            main(["vision", "--sizes", bad, "--out", str(tmp_path / "v")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err
        assert f"argument --sizes: expected comma-separated ints >= 10 or 'all', got '{bad}'" in err


@pytest.mark.parametrize("argv, message", [
    (["--models", "foo"], "argument --models: expected a comma-separated subset of vit,local,cnn, got 'foo'"),
    (["--k", "2"], "argument --k: expected an odd int >= 1, got '2'"),
    (["--patch-size", "3"], "argument --patch-size: invalid choice: 3"),
    (["--batch-size", "0"], "argument --batch-size: expected an int >= 1, got '0'"),
])
def test_bad_options_are_refused_at_parse_time(tmp_path, capsys, argv, message):
    from attnkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["vision", *argv, "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "v").exists()


def test_heads_that_do_not_divide_the_width_are_a_usage_error(tmp_path, capsys):
    from attnkit.cli import main

    assert main(["vision", "--quick", "--heads", "5", "--out", str(tmp_path / "v")]) == 2
    assert "attnkit vision: error: --heads (5) must divide --embed-dim (16)" in capsys.readouterr().err


def test_quick_keeps_the_options_given(tmp_path):
    """``--quick`` used to replace ``--sizes`` silently; now it only fills the options not given."""
    from attnkit.cli import main

    assert main(["vision", "--quick", "--sizes", "30", "--models", "cnn", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sizes"] == [30] and set(metrics["table"]) == {"cnn"}
