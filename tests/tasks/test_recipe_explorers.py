"""The vision and graph recipes write attention explorers: what the pages hold equals the models' weights, the
commands write and print ``attention.html``, and headless Chromium opens both pages (no console error, the image
view's patch weights and the graph view's edge weights equal the model's, hovering picks another query)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from attnkit.cli import main
from attnkit.tasks import graph_explorer, vision
from attnkit.tasks import vision_models as vm
from attnkit.tasks.graph import GAT, karate_club


def page_data(path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'id="attnkit-data">(.*?)</script>', text, re.S).group(1))


def weights_of(element) -> torch.Tensor:
    return torch.tensor([float(x) for x in element.get_attribute("data-w").split()])


def _vit_page(tmp_path):
    torch.manual_seed(0)
    model = vm.build("vit", embed_dim=16, depth=2, heads=2, patch_size=2, k=3, cnn_width=8).eval()
    _, _, x_test, y_test = vm.load_digits_split()
    path = vision.write_attention_html(tmp_path / "v.html", model, x_test[:2], y_test[:2], 2, title="vit")
    with torch.no_grad():
        _, weights = model(x_test[:2], need_weights=True)  # per layer (B, H, 17, 17)
    return path, weights


def _gat_page(tmp_path):
    torch.manual_seed(0)
    data = karate_club()
    model = GAT(data.num_features, data.num_classes, hidden=4, heads=3, dropout=0.0).eval()
    path = graph_explorer.write_attention_html(tmp_path / "g.html", model, data, data.x, center=0, max_nodes=12)
    with torch.no_grad():
        _, (ei, w), _ = model(data.x, data.edge_index, return_weights=True)  # (2, E'), (E', H)
    return path, data, ei, w


def test_vision_page_holds_every_layer_and_head_and_the_image(tmp_path):
    path, weights = _vit_page(tmp_path)
    d = page_data(path)
    assert len(d["examples"]) == 2
    ex = d["examples"][0]
    assert ex["tokens"]["source"][:2] == ["[class]", "patch r0c0"] and len(ex["tokens"]["source"]) == 17
    assert ex["image"]["grid"] == [4, 4] and len(ex["image"]["pixels"]) == 8
    layers = ex["kinds"][0]["layers"]
    assert len(layers) == 2 and len(layers[1]["heads"]) == 2
    hd = layers[1]["heads"][1]
    row = torch.zeros(17)
    for i in range(hd["ptr"][0], hd["ptr"][1]):
        row[hd["cols"][i]] = hd["vals"][i] / 1e4
    assert torch.allclose(row, torch.where(weights[1][0, 1, 0] >= 1e-3, weights[1][0, 1, 0], 0.0), atol=0.51e-4)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_explorer")
    assert main(["vision", "--quick", "--models", "vit,cnn", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph_explorer")
    assert main(["graph", "--out", str(out), "--epochs", "5", "--no-progress", "--threads", "1"]) == 0
    return out


def test_vision_command_writes_the_explorer(vision_run):
    assert len(page_data(vision_run / "attention.html")["examples"]) == 4


def test_recipe_pages_in_a_browser(browser, vision_run, graph_run):
    browser.open(vision_run / "attention.html")
    assert [o.text.split(":")[0] for o in browser.find_all("#example option")] == [f"test digit {i}" for i in range(4)]
    browser.select("#example", 3)
    assert len(browser.find_all("#iv canvas")) == 4  # --quick: 4 heads
    browser.open(graph_run / "attention.html")
    assert browser.find("#view-graph").is_displayed() and browser.find_all("#gv-svg line.att")
    assert browser.errors() == []


def test_graph_neighbourhood_and_its_weights(tmp_path):
    path, data, ei, w = _gat_page(tmp_path)
    nodes = graph_explorer.neighbourhood(data.edge_index, 0, hops=2, max_nodes=12)
    assert nodes[0] == 0 and len(nodes) == 12 and len(set(nodes)) == 12
    d = page_data(path)
    ex = d["examples"][0]
    assert ex["tokens"]["source"] == [str(n) for n in nodes] and ex["graph"]["center"] == 0
    layer = ex["kinds"][0]["layers"][0]
    hd = layer["heads"][2]
    got = {nodes[hd["cols"][i]]: hd["vals"][i] / 1e4 for i in range(hd["ptr"][0], hd["ptr"][1])}
    want = {int(j): float(a) for (j, i), a in zip(ei.T.tolist(), w[:, 2], strict=True) if i == 0 and j in nodes}
    assert got.keys() == {j for j, a in want.items() if a >= 1e-3}
    assert all(abs(got[j] - want[j]) <= 0.51e-4 for j in got)


def test_graph_command_writes_the_explorer(graph_run):
    assert page_data(graph_run / "attention.html")["examples"][0]["graph"]


def test_the_commands_print_where_the_explorer_is(tmp_path, capsys):
    assert main(["graph", "--out", str(tmp_path), "--epochs", "2", "--no-progress", "--threads", "1"]) == 0
    assert f"attention explorer (open in a browser): {tmp_path / 'attention.html'}" in capsys.readouterr().out


def test_vision_page_in_a_browser(browser, tmp_path):
    path, weights = _vit_page(tmp_path)
    browser.open(path)
    assert browser.errors() == []
    assert browser.find("#view-image").is_displayed()
    canvases = browser.find_all("#iv canvas")
    assert len(canvases) == 2
    for h, c in enumerate(canvases):  # the class token's attention over the 16 patches, layer 0
        want = weights[0][0, h, 0, 1:]
        assert torch.allclose(weights_of(c), torch.where(want >= 1e-3, want, 0.0), atol=0.51e-4)
    browser.hover(browser.find_all("#iv-queries .tok")[6])  # patch r1c1
    assert "patch r1c1" in browser.find("#iv figcaption").text
    browser.select("#layer", 1)
    want = weights[1][0, 1, 6, 1:]
    assert torch.allclose(weights_of(browser.find_all("#iv canvas")[1]), torch.where(want >= 1e-3, want, 0.0),
                          atol=0.51e-4)
    browser.screenshot("vision_image_view")
    assert browser.errors() == []


def test_graph_page_in_a_browser(browser, tmp_path):
    path, data, ei, w = _gat_page(tmp_path)
    nodes = graph_explorer.neighbourhood(data.edge_index, 0, hops=2, max_nodes=12)
    browser.open(path)
    assert browser.errors() == []
    assert browser.find("#view-graph").is_displayed()
    want = {int(j): w[k] for k, (j, i) in enumerate(ei.T.tolist()) if i == 0 and j in nodes}  # edges into node 0
    circles = browser.find_all("#gv-svg circle")
    assert [c.get_attribute("data-node") for c in circles] == [str(i) for i in range(len(nodes))]
    for c in circles:
        j = nodes[int(c.get_attribute("data-node"))]
        if j in want:
            assert torch.allclose(weights_of(c), torch.where(want[j] >= 1e-3, want[j], 0.0), atol=0.51e-4)
        else:
            assert c.get_attribute("data-w") is None
    assert len(browser.find_all("#gv-svg line.att")) == 3 * (len(want) - 1)  # every head, no self-loop line
    browser.hover(circles[3])
    assert f"“{nodes[3]}” (3)" in browser.find("#gv-readout").text
    browser.screenshot("graph_view")
    browser.select("#layer", 1)  # the output layer: one head
    assert len(browser.find_all("#heads button")) == 1 and browser.find_all("#gv-svg line.att")
    browser.find("#tab-model").click()
    assert len(browser.find_all("#mv figure")) == 3 + 1
    assert browser.errors() == []
