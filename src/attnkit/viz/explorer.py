"""An interactive attention explorer written as one self-contained HTML file (no network, no CDN).

    write_explorer("attention.html", tokens, weights)                 # self-attention of one sequence
    write_explorer("attention.html", src, weights, target_tokens=tgt) # cross-attention (T, S)
    ex = Explorer(title="run 3"); ex.add(src, {"encoder self": enc, "cross": cross}, target_tokens=tgt); ex.write(p)
    explore(tokens, weights)                                          # in a notebook: displays inline

The page has a head view (tokens on two sides, one line per kept weight with opacity = weight, a colour per head;
hover a token to isolate its row or column, click a head to toggle it), a matrix view (a heatmap per layer and
head, the exact stored weight on hover), a model view (thumbnails of every layer x head; click one to open it),
and, when given, an image view (patch attention drawn over the image) and a graph view (edge opacity = weight).
Tokens are text in the page (selectable, searchable, read by screen readers), never pixels.

Long inputs stay responsive: each query row keeps its ``top_k`` largest weights that are at least
``threshold`` (chosen automatically to keep about ``max_entries`` per example), and the page says so. Sparse COO
weights are thinned from their stored entries; no ``(T, S)`` tensor is made from them. The page's data is JSON
(integers = weights x 10**decimals, CSR rows) inside a ``<script type="application/json">`` with ``<``, ``>``
and ``&`` escaped, and the page inserts tokens with ``textContent`` only, so no token can inject markup.
Jinja2 is imported inside the functions that render.
"""

from __future__ import annotations

import html as _html
import json
from dataclasses import asdict
from pathlib import Path

from attnkit._io import write_text_atomic
from attnkit.viz import explorer_data as data

__all__ = ["Explorer", "explore", "write_explorer"]

DEFAULT_MAX_ENTRIES = 1_000_000  # kept weights per example: ~10 MB of JSON at 4 decimals
_ASSETS = Path(__file__).with_name("explorer_assets")


class Explorer:
    """A page of one or more examples (sentences, images, graphs), each with one or more attention kinds.

    Args:
        title: the page's title.
        top_k: keys kept per query row; ``None`` (default) keeps every key when the example has at most
            ``max_entries`` weights, else the ``top_k`` that keeps about ``max_entries``.
        threshold: weights below it are dropped (default ``1e-3``).
        decimals: weights are rounded to this many decimals (default 4).
        max_entries: the budget of kept weights per example when ``top_k`` is ``None``.

    The object displays itself inline in a notebook (``_repr_html_``: the page in a sandboxed ``iframe``).
    """

    def __init__(self, *, title: str = "attention explorer", top_k: int | None = None, threshold: float = 1e-3,
                 decimals: int = 4, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if not isinstance(title, str):
            raise TypeError(f"title must be a str; got {type(title).__name__}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}")
        if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1]; got {threshold!r}")
        if isinstance(decimals, bool) or not isinstance(decimals, int) or not 1 <= decimals <= 6:
            raise ValueError(f"decimals must be an int in [1, 6]; got {decimals!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1; got {max_entries!r}")
        self.title, self.top_k, self.threshold = title, top_k, float(threshold)
        self.decimals, self.max_entries = decimals, max_entries
        self.examples: list[dict] = []

    def add(self, tokens, weights, *, target_tokens=None, name: str | None = None, batch_index: int = 0,
            image=None, patch_grid: tuple[int, int] | None = None, patch_offset: int = 1, positions=None,
            center: int | None = None) -> Explorer:
        """Add one example; return ``self`` (calls chain).

        Args:
            tokens: the source (key) tokens, or the one sequence of a self-attention; strings.
            weights: a tensor ``(T, S)``, ``(H, T, S)`` or ``(B, H, T, S)`` (dense or sparse COO), a list/tuple
                over layers of those (Hugging Face ``output_attentions``), or a dict from a kind's name
                ("encoder self", "decoder self", "cross", ...) to either.
            target_tokens: the output (query) tokens of a cross-attention. A kind's rows and columns are found
                from its shape: ``(T, S)`` = target x source, ``(S, S)`` = source, ``(T, T)`` = target; when
                ``T == S`` its name decides ("cross" = target x source, "decoder"/"target" = target x target).
            name: the example's label on the page (default: its tokens).
            batch_index: which batch row of 4-D weights to show.
            image: ``(h, w)`` pixel values of an image whose patches are tokens; patch_grid ``(rows, cols)`` of
                patches; tokens[patch_offset + r * cols + c] is patch (r, c) (default offset 1: a class token).
            positions: ``(N, 2)`` node coordinates of a graph whose nodes are the tokens; center: the node
                shown first.

        Shape:
            - weights: ``(T, S)``, ``(H, T, S)`` or ``(B, H, T, S)``; ``T`` = len(target_tokens) (or
              len(tokens) for self-attention), ``S`` = len(tokens)
        """
        src = _check_tokens("tokens", tokens)
        tgt = None if target_tokens is None else _check_tokens("target_tokens", target_tokens)
        named = weights if isinstance(weights, dict) else {"cross" if tgt is not None else "self": weights}
        if not named:
            raise ValueError("weights must hold at least one attention kind; got an empty dict")
        kinds_in = []
        for kind_name, w in named.items():
            if not isinstance(kind_name, str):
                raise TypeError(f"weights' keys must be str (kind names); got {type(kind_name).__name__}")
            layers = data.as_layers(f"weights[{kind_name!r}]" if isinstance(weights, dict) else "weights", w,
                                    batch_index=batch_index)
            shape = tuple(layers[0].shape[1:])
            for i, layer in enumerate(layers):
                if tuple(layer.shape[1:]) != shape:
                    raise ValueError(f"every layer of weights[{kind_name!r}] must have the shape (T, S) of layer 0 "
                                     f"{shape}; layer {i} is {tuple(layer.shape[1:])}")
            kinds_in.append((kind_name, _sides(kind_name, shape, src, tgt), layers))
        extra = {}  # checked before the (slower) thinning
        if image is not None:
            extra["image"] = _image(image, patch_grid, patch_offset, len(src))
        if positions is not None:
            extra["graph"] = _graph(positions, len(src), center)
        rows = sum(layer.shape[0] * layer.shape[1] for _, _, layers in kinds_in for layer in layers)
        given = sum(data.entries(layer) for _, _, layers in kinds_in for layer in layers)
        top_k = self.top_k if self.top_k is not None else data.auto_top_k(rows, given, self.max_entries)
        kinds, kept, stored, mass = [], 0, 0, []
        for kind_name, (row_side, col_side), layers in kinds_in:
            out = []
            for layer in layers:
                c = data.compact(layer, top_k=top_k, threshold=self.threshold, decimals=self.decimals)
                kept, stored = kept + c.kept, stored + c.stored
                mass.append(c.mass_kept)
                out.append({"T": c.shape[0], "S": c.shape[1], "heads": [asdict(h) for h in c.heads]})
            kinds.append({"name": kind_name, "rows": row_side, "cols": col_side, "layers": out})
        example = {
            "name": name if name is not None else _label(src, tgt),
            "tokens": {"source": src, "target": tgt}, "kinds": kinds,
            "thinning": {"top_k": top_k, "threshold": self.threshold, "kept": kept, "stored": stored,
                         "mass_kept": min(mass) if mass else 1.0},
            **extra,
        }
        self.examples.append(example)
        return self

    def html(self) -> str:
        """The whole page as a string."""
        if not self.examples:
            raise ValueError("the explorer has no example to show; call add(tokens, weights) first")
        import jinja2

        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_ASSETS)), autoescape=True)
        page = {"title": self.title, "decimals": self.decimals, "examples": self.examples}
        return env.get_template("explorer.html.j2").render(
            title=self.title,
            css=jinja2.utils.markupsafe.Markup((_ASSETS / "explorer.css").read_text(encoding="utf-8")),
            js=jinja2.utils.markupsafe.Markup((_ASSETS / "explorer.js").read_text(encoding="utf-8")),
            data=jinja2.utils.markupsafe.Markup(_script_json(page)),
        )

    def write(self, path: str | Path) -> Path:
        """Write the page to ``path`` (atomically); return the path."""
        path = Path(path)
        write_text_atomic(path, self.html())
        return path

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{_html.escape(self.html(), quote=True)}" sandbox="allow-scripts" '
                'style="width: 100%; height: 720px; border: 1px solid #ddd"></iframe>')


def explore(tokens, weights, **kwargs) -> Explorer:
    """An :class:`Explorer` of one example (shown inline when it is the last value of a notebook cell).

    ``kwargs`` go to :class:`Explorer` (title, top_k, threshold, decimals, max_entries) or to
    :meth:`Explorer.add` (the rest).
    """
    own = {k: kwargs.pop(k) for k in ("title", "top_k", "threshold", "decimals", "max_entries") if k in kwargs}
    return Explorer(**own).add(tokens, weights, **kwargs)


def write_explorer(path: str | Path, tokens, weights, **kwargs) -> Path:
    """Write the explorer of one example to ``path`` (one self-contained HTML file); return the path.

    Args and Shape: as :meth:`Explorer.add` (and :class:`Explorer` for title, top_k, threshold, decimals,
    max_entries).

    Example::

        out, w = attention(q, k, v, return_weights=True)        # w (B, H, L, S)
        write_explorer("attn.html", tokens, w)                  # batch row 0
        write_explorer("hf.html", tokens, hf_out.attentions)    # every layer of a Hugging Face model
    """
    return explore(tokens, weights, **kwargs).write(path)


def _check_tokens(name: str, tokens) -> list[str]:
    if isinstance(tokens, str) or not isinstance(tokens, list | tuple):
        raise TypeError(f"{name} must be a list of strings (one per position); got {type(tokens).__name__}"
                        + (". Split the text first, e.g. text.split()" if isinstance(tokens, str) else ""))
    if not tokens:
        raise ValueError(f"{name} must hold at least one token; got none")
    bad = [t for t in tokens if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{name} must hold strings; got {type(bad[0]).__name__} {bad[0]!r}")
    return list(tokens)


def _label(src: list[str], tgt: list[str] | None, most: int = 16) -> str:
    def cut(toks: list[str]) -> str:
        return " ".join(toks) if len(toks) <= most else " ".join(toks[:most]) + f" … ({len(toks)} tokens)"

    return cut(src) if tgt is None else f"{cut(src)} → {cut(tgt)}"


def _sides(kind: str, shape: tuple[int, int], src: list[str], tgt: list[str] | None) -> tuple[str, str]:
    """Which token list labels the rows and the columns of a kind of shape ``(T, S)``."""
    S, T = len(src), None if tgt is None else len(tgt)
    fits = []
    if T is not None and shape == (T, S):
        fits.append(("target", "source"))
    if shape == (S, S):
        fits.append(("source", "source"))
    if T is not None and shape == (T, T):
        fits.append(("target", "target"))
    if not fits:
        want = f"({S}, {S}) = (len(tokens), len(tokens))"
        if T is not None:
            want = f"({T}, {S}) = (len(target_tokens), len(tokens)), {want} or ({T}, {T})"
        raise ValueError(f"weights[{kind!r}] must be {want}; got (T, S) = {shape}. Cut padding to the real tokens, "
                         "e.g. weights[..., :T, :S]")
    if len(fits) == 1:
        return fits[0]
    low = kind.lower()
    if "cross" in low and ("target", "source") in fits:
        return ("target", "source")
    if ("decoder" in low or "target" in low) and ("target", "target") in fits:
        return ("target", "target")
    if any(word in low for word in ("encoder", "source", "self")) and ("source", "source") in fits:
        return ("source", "source")
    return fits[0]


def _image(image, patch_grid, patch_offset: int, n_tokens: int) -> dict:
    import torch

    img = torch.as_tensor(image, dtype=torch.float32).detach().cpu()
    if img.dim() == 3 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 2:
        raise ValueError(f"image must be (h, w) or (1, h, w); got shape {tuple(img.shape)}")
    if patch_grid is None or len(patch_grid) != 2 or min(patch_grid) < 1:
        raise ValueError(f"patch_grid must be (rows, cols) of patches when image is given; got {patch_grid!r}")
    gh, gw = int(patch_grid[0]), int(patch_grid[1])
    if not 0 <= patch_offset or patch_offset + gh * gw > n_tokens:
        raise ValueError(f"tokens[patch_offset : patch_offset + rows * cols] must be the patches: patch_offset "
                         f"{patch_offset} + {gh} * {gw} > {n_tokens} tokens")
    lo, hi = float(img.min()), float(img.max())
    norm = (img - lo) / (hi - lo) if hi > lo else img * 0
    return {"pixels": torch.round(norm * 255).to(torch.int64).tolist(), "grid": [gh, gw], "offset": patch_offset}


def _graph(positions, n_tokens: int, center: int | None) -> dict:
    import numpy as np
    import torch

    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    pos = torch.from_numpy(np.asarray(positions, dtype=np.float64))
    if pos.shape != (n_tokens, 2):
        raise ValueError(f"positions must be (N, 2) = ({n_tokens}, 2), one point per token; got {tuple(pos.shape)}")
    lo, span = pos.min(0).values, (pos.max(0).values - pos.min(0).values).clamp_min(1e-9)
    pos = (pos - lo) / span  # each axis in [0, 1]
    if center is not None and not 0 <= center < n_tokens:
        raise ValueError(f"center must be a node index in [0, {n_tokens}); got {center}")
    return {"pos": [[round(x, 4), round(y, 4)] for x, y in pos.tolist()], "center": center or 0}


def _script_json(obj) -> str:
    """JSON safe to place inside ``<script type="application/json">``: no ``<``, ``>``, ``&`` or line separators
    appear raw, so no token can close the script or open a tag."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                     ("\u2029", "\\u2029")):
        text = text.replace(raw, esc)
    return text
