"""``attnkit translate`` writes attention explorers: ``attention.html`` in the run directory (train and eval) and
``predict --html FILE``; the Transformer's page holds every layer and head of its three attentions; the demo's page
opened in headless Chromium shows its sentences and hovering "march" highlights the weights the model gave."""

from __future__ import annotations

import json
import re

import pytest
import torch

from attnkit.cli import main
from attnkit.tasks.translate.checkpoint import load_trained
from attnkit.tasks.translate.evaluate import translate_tokens
from attnkit.tasks.translate.explorer import write_attention_html
from attnkit.tasks.translate.models import build_model
from attnkit.tasks.translate.vocab import Vocab


def page_data(path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'id="attnkit-data">(.*?)</script>', text, re.S).group(1))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo translator (additive attention, embedded date task), 2 epochs: exact match ~95 %."""
    out = tmp_path_factory.mktemp("translate_explorer") / "run"
    before = torch.get_num_threads()
    code = main(["translate", "train", "--out", str(out), "--epochs", "2", "--hidden", "48", "--embed-dim", "24",
                 "--no-progress"])
    torch.set_num_threads(before)
    assert code == 0
    return out


def test_train_writes_the_explorer_of_the_heatmap_sentences(demo):
    d = page_data(demo / "attention.html")
    samples = (demo / "samples.txt").read_text().split("\n\n")[:4]
    assert len(d["examples"]) == 4
    for ex, sample in zip(d["examples"], samples, strict=True):
        src = re.search(r"src: (.*)", sample).group(1)
        assert ex["tokens"]["source"] == src.split()  # the embedded task keeps its words: "march" is one token
        (kind,) = ex["kinds"]
        assert (kind["rows"], kind["cols"]) == ("target", "source") and len(kind["layers"][0]["heads"]) == 1
    assert "march" in d["examples"][0]["tokens"]["source"]


def test_predict_html_and_its_errors(demo, tmp_path, capsys):
    page = tmp_path / "out.html"
    assert main(["translate", "predict", "--run", str(demo), "--html", str(page), "friday may thirty one",
                 "monday march twenty four"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and str(page) in captured.err
    d = page_data(page)
    assert [e["tokens"]["source"] for e in d["examples"]] == [["friday", "may", "thirty", "one"],
                                                             ["monday", "march", "twenty", "four"]]
    for bad in ("out.txt", str(tmp_path)):  # refused at parse time: argparse's message, exit 2, no traceback
        with pytest.raises(SystemExit) as exit_:
            main(["translate", "predict", "--run", str(demo), "--html", bad, "friday may one"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "argument --html: expected the path of an .html file to write" in err and "Traceback" not in err


def test_transformer_page_holds_every_layer_and_head(tmp_path):
    torch.manual_seed(0)
    src_vocab, tgt_vocab = Vocab(["a", "b", "c"]), Vocab(["x", "y"])
    model = build_model({"kind": "transformer", "src_vocab": len(src_vocab), "tgt_vocab": len(tgt_vocab),
                         "embed_dim": 16, "hidden": 16, "num_layers": 2, "dropout": 0.0, "num_heads": 2,
                         "ff_dim": 32, "max_len": 16}).eval()
    sample = {"src": ["a", "b", "c", "a"], "hyp": ["y", "x"], "weights": torch.full((3, 4), 0.25)}
    d = page_data(write_attention_html(tmp_path / "t.html", model, [sample], src_vocab, tgt_vocab, title="t"))
    kinds = {k["name"]: k for k in d["examples"][0]["kinds"]}
    shapes = {n: (len(k["layers"]), len(k["layers"][0]["heads"]), k["layers"][0]["T"], k["layers"][0]["S"])
              for n, k in kinds.items()}
    assert shapes == {"cross": (2, 2, 3, 4), "encoder self": (2, 2, 4, 4), "decoder self": (2, 2, 3, 3)}
    dec = kinds["decoder self"]["layers"][1]["heads"][0]
    assert all(c <= t for t in range(3) for c in dec["cols"][dec["ptr"][t]: dec["ptr"][t + 1]])  # causal


def test_demo_page_in_a_browser_hovering_march(browser, demo):
    browser.open(demo / "attention.html")
    assert browser.errors() == []
    options = [o.text for o in browser.find_all("#example option")]
    samples = (demo / "samples.txt").read_text().split("\n\n")[:4]
    for option, sample in zip(options, samples, strict=True):
        assert option.startswith(re.search(r"src: (.*)", sample).group(1))
    keys = browser.find_all("#hv-cols .tok")
    src = [k.text for k in keys]
    assert "march" in src
    browser.hover(keys[src.index("march")])
    queries = browser.find_all("#hv-rows .tok")
    got = torch.tensor([float(q.get_attribute("data-w")) for q in queries])  # (T,): the column of "march"
    model, _, src_vocab, tgt_vocab = load_trained(demo)
    ((hyp, w, _),) = translate_tokens(model, [src], src_vocab, tgt_vocab)
    assert [q.text for q in queries] == hyp + ["<eos>"]
    assert torch.allclose(got, torch.where(w[:, src.index("march")] >= 1e-3, w[:, src.index("march")], 0.0),
                          atol=0.51e-4)
    assert hyp[int(got.argmax())] == "mars"  # the output word that reads "march" most is its translation
    browser.screenshot("translate_demo_march")
    assert browser.errors() == []


def test_predict_page_in_a_browser(browser, demo, tmp_path):
    page = tmp_path / "p.html"
    assert main(["translate", "predict", "--run", str(demo), "--html", str(page), "sunday june nine"]) == 0
    browser.open(page)
    assert "sunday june nine" in browser.find("#sentence").text
    browser.hover(browser.find_all("#hv-rows .tok")[0])
    assert browser.find_all("#hv-cols .tok.hl")
    browser.find("#tab-matrix").click()
    browser.screenshot("translate_predict_matrix")
    assert browser.errors() == []


def test_eval_writes_the_explorer_too(demo, tmp_path, capsys):
    assert main(["translate", "eval", "--run", str(demo), "--out", str(tmp_path)]) == 0
    assert str(tmp_path / "attention.html") in capsys.readouterr().out
    assert page_data(tmp_path / "attention.html")["examples"] == page_data(demo / "attention.html")["examples"]
