"""The explorer in headless Chromium: no console error, hovering a token highlights exactly the weights given,
heads and layers switch, the matrix view reads back the weight under the mouse, the model view opens a thumbnail,
a hostile token stays text, and a 2,048-token 8-head layer opens in under 5 s. Screenshots go to
``runs/test-artifacts`` (see tests/browser.py)."""

from __future__ import annotations

import pytest
import torch

from attnkit.viz.explorer import write_explorer

EVIL = "</script><img onerror=alert(1) src=x>"


def weights_of(element) -> list[float]:
    return [float(x) for x in element.get_attribute("data-w").split()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    w = torch.softmax(3 * torch.randn(2, 3, 5, 6, generator=gen), dim=-1)  # 2 layers, 3 heads, (T, S) = (5, 6)
    src, tgt = ["le", "chat", EVIL, "sur", "le", "tapis"], ["the", "cat", "sat", "on", "mat"]
    path = write_explorer(tmp_path_factory.mktemp("explorer") / "small.html", src, list(w), target_tokens=tgt,
                          title="small", threshold=0.0)
    return path, w, src, tgt


def test_head_view_hover_isolates_the_row_and_heads_and_layers_switch(browser, small):
    path, w, src, tgt = small
    browser.open(path)
    assert browser.errors() == []
    queries = browser.find_all("#hv-rows .tok")
    assert [q.text for q in queries] == tgt and [k.text for k in browser.find_all("#hv-cols .tok")] == src
    browser.hover(queries[2])  # "sat"
    got = torch.tensor([weights_of(k) for k in browser.find_all("#hv-cols .tok")])  # (S, H)
    assert torch.allclose(got.T, w[0, :, 2, :], atol=0.51e-4)
    assert len(browser.find_all("#hv-svg line")) == int((w[0, :, 2, :] >= 0.5e-4).sum())  # none for 0s
    browser.screenshot("explorer_head_view")
    browser.find("#heads button[data-head='1']").click()  # hide head 1
    browser.hover(browser.find_all("#hv-rows .tok")[1])  # the head toggle redrew the tokens
    lines = browser.find_all("#hv-svg line")
    assert {ln.get_attribute("data-head") for ln in lines} == {"0", "2"}
    browser.hover(browser.find_all("#hv-cols .tok")[4])  # a key: its column
    got = torch.tensor([weights_of(q) for q in browser.find_all("#hv-rows .tok")])  # (T, H)
    assert torch.allclose(got.T, w[0, :, :, 4], atol=0.51e-4)
    browser.select("#layer", 1)
    browser.hover(browser.find_all("#hv-rows .tok")[0])
    got = torch.tensor([weights_of(k) for k in browser.find_all("#hv-cols .tok")])
    assert torch.allclose(got.T, w[1, :, 0, :], atol=0.51e-4)
    assert browser.errors() == []


def test_matrix_view_reads_back_the_weight_and_model_view_opens_a_head(browser, small):
    path, w, src, tgt = small
    browser.open(path)
    browser.find("#tab-model").click()
    thumbs = browser.find_all("#mv figure")
    assert len(thumbs) == 2 * 3
    browser.screenshot("explorer_model_view")
    browser.find("#mv figure[data-layer='1'][data-head='2']").click()
    assert browser.find("#view-matrix").is_displayed()
    canvas = browser.find("#mx-canvas")
    cell = int(canvas.get_attribute("data-cell"))
    size = canvas.size
    t, j = 3, 1  # the middle of cell (t, j), as an offset from the canvas centre
    browser.hover(canvas, int((j + 0.5) * cell - size["width"] / 2), int((t + 0.5) * cell - size["height"] / 2))
    out = browser.find("#mx-readout")
    assert (out.get_attribute("data-i"), out.get_attribute("data-j")) == (str(t), str(j))
    assert abs(float(out.get_attribute("data-w")) - float(w[1, 2, t, j])) <= 0.51e-4
    assert "layer 1, head 2" in out.text and "“on”" in out.text and "“chat”" in out.text
    browser.screenshot("explorer_matrix_view")
    assert browser.errors() == []


def test_a_hostile_token_renders_as_text(browser, small):
    path, *_ = small
    browser.open(path)
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.driver.switch_to.alert.text  # noqa: B018
    assert browser.find_all("img") == []
    assert EVIL in [k.text for k in browser.find_all("#hv-cols .tok")]
    assert EVIL in browser.find("#sentence").text
    assert browser.errors() == []


def test_2048_tokens_8_heads_open_in_under_5_s(browser, tmp_path):
    gen = torch.Generator().manual_seed(0)
    L = 2048
    w = torch.softmax(3 * torch.randn(8, L, L, generator=gen), dim=-1)  # (H, L, S)
    path = write_explorer(tmp_path / "long.html", [f"w{i}" for i in range(L)], w)
    size = path.stat().st_size
    ms = browser.open(path)
    print(f"2048 tokens x 8 heads: {size / 1e6:.1f} MB, ready {ms:.0f} ms after navigation start")
    assert size < 20e6 and ms < 5000
    assert "top 61 keys" in browser.find("#notice").text
    row = browser.find_all("#hv-rows .tok")[1500]
    browser.hover(row)
    keys = [k for k in browser.find_all("#hv-cols .tok.hl")]
    assert 1 <= len(keys) <= 8 * 61
    assert browser.errors() == []
