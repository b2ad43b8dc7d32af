"""attnkit.viz.explorer without a browser: what the page's JSON holds equals the weights given (dense, sparse COO,
Hugging Face tuples, named kinds), long inputs are thinned as documented, tokens cannot inject markup, and a sparse
window-masked 2,048-token layer is written without making an L x S tensor."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnkit.viz.explorer import Explorer, explore, write_explorer

EVIL = "</script><img onerror=alert(1) src=x>"


def page_data(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>', text, re.S)
    assert m, "no data script"
    return json.loads(m.group(1))


def dense_of(layer: dict, decimals: int = 4) -> torch.Tensor:
    """The (H, T, S) weights a layer of the page holds."""
    out = torch.zeros(len(layer["heads"]), layer["T"], layer["S"], dtype=torch.float64)
    for h, hd in enumerate(layer["heads"]):
        for t in range(layer["T"]):
            for i in range(hd["ptr"][t], hd["ptr"][t + 1]):
                out[h, t, hd["cols"][i]] = hd["vals"][i] / 10 ** decimals
    return out


def softmax_weights(gen, *shape):
    return torch.softmax(torch.randn(*shape, generator=gen), dim=-1)


def test_dense_layers_round_trip_to_four_decimals(gen, tmp_path):
    w = softmax_weights(gen, 3, 2, 5, 5)  # 3 layers of (H, T, S)
    toks = list("abcde")
    path = write_explorer(tmp_path / "a.html", toks, list(w), title="t")
    d = page_data(path.read_text())
    (kind,) = d["examples"][0]["kinds"]
    assert (kind["name"], kind["rows"], kind["cols"]) == ("self", "source", "source")
    for layer, ref in zip(kind["layers"], w, strict=True):
        want = torch.where(ref >= 1e-3, ref.double(), 0.0)
        assert torch.allclose(dense_of(layer), want, atol=0.5e-4 + 1e-12)
    assert d["examples"][0]["thinning"]["top_k"] is None


def test_hugging_face_tuple_picks_the_batch_row(gen):
    att = tuple(softmax_weights(gen, 2, 4, 3, 3) for _ in range(2))  # layers of (B, H, T, S)
    d = page_data(explore(["x", "y", "z"], att, batch_index=1).html())
    for layer, ref in zip(d["examples"][0]["kinds"][0]["layers"], att, strict=True):
        assert torch.allclose(dense_of(layer), torch.where(ref[1] >= 1e-3, ref[1].double(), 0.0), atol=0.5e-4)


def test_named_kinds_get_their_rows_and_columns(gen):
    src, tgt = ["a", "b", "c"], ["x", "y", "z"]  # T == S: the names decide
    kinds = {"encoder self": softmax_weights(gen, 2, 3, 3), "decoder self": softmax_weights(gen, 2, 3, 3),
             "cross": [softmax_weights(gen, 2, 3, 3)]}
    d = page_data(explore(src, kinds, target_tokens=tgt).html())
    got = {k["name"]: (k["rows"], k["cols"]) for k in d["examples"][0]["kinds"]}
    assert got == {"encoder self": ("source", "source"), "decoder self": ("target", "target"),
                   "cross": ("target", "source")}
    d = page_data(explore(src, softmax_weights(gen, 4, 3), target_tokens=["x", "y", "z", "w"]).html())
    assert (d["examples"][0]["kinds"][0]["rows"], d["examples"][0]["kinds"][0]["cols"]) == ("target", "source")


def test_top_k_and_threshold_keep_the_largest_weights(gen):
    w = softmax_weights(gen, 2, 6, 10)
    d = page_data(explore(list("abcdefghij"), w, target_tokens=list("uvwxyz"), top_k=3, threshold=0.05).html())
    got = dense_of(d["examples"][0]["kinds"][0]["layers"][0])
    top = w.topk(3, dim=-1)
    want = torch.zeros_like(got).scatter(-1, top.indices, top.values.double())
    want = torch.where(want >= 0.05, want, 0.0)
    assert torch.allclose(got, want, atol=0.5e-4)
    assert d["examples"][0]["thinning"]["top_k"] == 3


def test_sparse_coo_equals_its_dense_form(gen):
    w = softmax_weights(gen, 2, 2, 7, 7)  # (B, H, T, S)
    w = w * (torch.rand(w.shape, generator=gen) > 0.5)
    sparse = w.to_sparse_coo().coalesce()
    a = page_data(explore(list("abcdefg"), sparse, batch_index=1, top_k=2).html())
    b = page_data(explore(list("abcdefg"), w, batch_index=1, top_k=2).html())
    assert a["examples"][0]["kinds"] == b["examples"][0]["kinds"]


class _Largest(TorchDispatchMode):
    """Records the most elements (dense) or stored entries (sparse) any aten op produced."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                n = t._nnz() if t.layout == torch.sparse_coo else t.numel()
                self.most = max(self.most, n)
        return out


def window_sparse(L: int, H: int, left: int, gen) -> torch.Tensor:
    """A causal window-masked softmax built directly as sparse COO ``(H, L, L)``: query i sees i-left .. i."""
    i = torch.arange(L).repeat_interleave(left + 1)
    j = i - torch.arange(left + 1).repeat(L)
    keep = j >= 0
    i, j = i[keep], j[keep]
    h = torch.arange(H).repeat_interleave(i.numel())
    scores = torch.randn(h.numel(), generator=gen)
    idx = torch.stack([h, i.repeat(H), j.repeat(H)])
    e = scores.exp()
    rows = idx[0] * L + idx[1]
    w = e / torch.zeros(H * L).index_add(0, rows, e)[rows]
    return torch.sparse_coo_tensor(idx, w, (H, L, L), check_invariants=False).coalesce()


def test_window_masked_2048_layer_from_sparse_makes_no_dense_matrix(gen, tmp_path):
    L, H, left = 2048, 8, 16
    w = window_sparse(L, H, left, gen)
    with _Largest() as probe:
        path = write_explorer(tmp_path / "window.html", [f"t{i}" for i in range(L)], w)
    assert probe.most < L * L  # not even one head's (L, S) was made; the stored entries are H * ~L * 17
    d = page_data(path.read_text())
    th = d["examples"][0]["thinning"]
    assert th["top_k"] is None and th["stored"] == w._nnz()
    layer = d["examples"][0]["kinds"][0]["layers"][0]
    row = layer["heads"][3]
    t = 1000
    cols = row["cols"][row["ptr"][t]: row["ptr"][t + 1]]
    assert cols and all(t - left <= c <= t for c in cols)


def test_tokens_are_escaped_in_the_page(gen):
    text = explore(["ok", EVIL], softmax_weights(gen, 2, 2), title="<b>bold</b> & co").html()
    assert "<img" not in text and "onerror=alert(1) src=x>" not in text
    assert "<title>&lt;b&gt;bold&lt;/b&gt; &amp; co</title>" in text
    assert page_data(text)["examples"][0]["tokens"]["source"] == ["ok", EVIL]
    assert text.count("</script>") == 2  # the data and the code: no token closed a script


def test_repr_html_is_a_sandboxed_iframe_of_the_page(gen):
    ex = explore(["a", "b"], softmax_weights(gen, 2, 2))
    out = ex._repr_html_()
    assert out.startswith("<iframe srcdoc=\"") and 'sandbox="allow-scripts"' in out
    assert html.unescape(out.split('srcdoc="', 1)[1].split('" sandbox', 1)[0]) == ex.html()


def test_mistakes_are_clear_errors(gen):
    w = softmax_weights(gen, 2, 3, 3)
    with pytest.raises(TypeError, match="tokens must be a list of strings.*split"):
        explore("a b c", w)
    with pytest.raises(ValueError, match=r"weights\['self'\] must be \(3, 3\).*got \(T, S\) = \(3, 4\)"):
        explore(list("abc"), softmax_weights(gen, 2, 3, 4))
    with pytest.raises(TypeError, match=r"weights\[1\] must be a torch.Tensor"):
        explore(list("abc"), [w, "w"])
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1; got 0"):
        Explorer(top_k=0)
    with pytest.raises(ValueError, match="batch_index must be in"):
        explore(list("abc"), w[None], batch_index=2)
    with pytest.raises(ValueError, match="no example"):
        Explorer().html()
    with pytest.raises(ValueError, match="weights must be finite"):
        explore(list("abc"), torch.full((3, 3), float("nan")))


def test_the_page_needs_no_network(gen):
    text = explore(["a", "b"], softmax_weights(gen, 2, 2)).html()
    assert re.findall(r"https?://[^\s\"']+", text) == ["http://www.w3.org/2000/svg"] * 3  # SVG namespaces only
    assert " src=" not in text and " href=" not in text and "@import" not in text


def test_what_attention_returns_goes_in_as_is(gen):
    from attnkit import masks
    from attnkit.functional import attention

    q, k, v = (torch.randn(2, 3, 9, 4, generator=gen) for _ in range(3))
    _, w = attention(q, k, v, mask=masks.window(2, 0), return_weights=True)  # (B, H, L, S)
    d = page_data(explore([f"t{i}" for i in range(9)], w, batch_index=1).html())
    layer = d["examples"][0]["kinds"][0]["layers"][0]
    assert torch.allclose(dense_of(layer), torch.where(w[1] >= 1e-3, w[1].double(), 0.0), atol=0.5e-4)
    for hd in layer["heads"]:  # the window: query t reads keys t-2 .. t only
        assert all(t - 2 <= c <= t for t in range(9) for c in hd["cols"][hd["ptr"][t]: hd["ptr"][t + 1]])
