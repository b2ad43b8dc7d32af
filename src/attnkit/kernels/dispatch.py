"""Backend selection for :func:`attnkit.functional.attention`.

``choose`` picks the fastest backend that can serve a request from the mask's structure; ``validate`` checks an
explicitly named backend and says why it cannot serve a request (no silent fallback); ``run`` calls it.
Every backend implements the same contract::

    fn(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights)
        -> out | (out, weights)

with ``mask`` an :class:`attnkit.masks.Mask` (tensor masks arrive wrapped in ``Dense``) or ``None``.

==============  ==========================================================================================
backend         serves
==============  ==========================================================================================
``sdpa``        dot-product softmax with no mask, full, causal, padding or dense masks (PyTorch's fused kernel)
``math``        everything (the plain reference; materializes ``(..., L, S)``)
``window``      dot-product softmax with a ``Window(left, right)`` mask, both widths finite
``blocksparse`` dot-product softmax with any mask: only the non-empty ``128 x 128`` tiles are computed
``graph``       dot-product softmax with a ``Graph`` mask: attention along the edge list, O(E)
``chunked``     any score callable and bias with softmax: online softmax over key chunks
==============  ==========================================================================================

``auto`` rules: a graph mask goes to ``graph``; a narrow window (at most a quarter of the keys) on a problem
with at least 256 x 256 pairs to ``window``; other structured masks (and dense masks from 1024 x 1024 pairs)
whose tiles are at most 30 % non-empty to ``blocksparse``; otherwise ``sdpa`` when it can serve the request,
``chunked`` for non-dot scores or biases on problems of at least 512 x 512 pairs, else ``math``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit import masks as _masks
from attnkit.functional import scores as _scores
from attnkit.kernels._tiles import cached_on_mask
from attnkit.kernels.math import math_attention
from attnkit.kernels.sdpa import sdpa_attention
from attnkit.kernels.sdpa import supports as sdpa_supports

_TILE = 128


def _always(**_) -> None:
    return None


def _dot_scale(query, score, scale) -> float:
    """Scale of a dot-product score: ``scale`` replaces 1/sqrt(D) for scaled_dot, multiplies ``dot``."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(query.shape[-1]) if score is _scores.scaled_dot else 1.0


def _softmax_dot_reason(*, score, bias, normalize, dropout_p, **_) -> str | None:
    if score not in (_scores.scaled_dot, _scores.dot):
        return "it computes dot-product scores only (score=scaled_dot or dot); use backend='chunked'"
    if normalize != "softmax":
        return "it normalizes with softmax only; use backend='math'"
    if bias is not None:
        return "it takes no bias; use backend='chunked' (online softmax with bias) or 'math'"
    if dropout_p > 0:
        return "it has no dropout on the weights; use backend='math'"
    return None


# ---- window ---------------------------------------------------------------------------------------------------

def _window_supports(*, mask=None, **request) -> str | None:
    reason = _softmax_dot_reason(**request)
    if reason:
        return reason
    if type(mask) is not _masks.Window or mask.left is None or mask.right is None:
        return f"it needs mask=masks.window(left, right) with both widths finite; got {mask!r}"
    return None


def _window_run(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights):
    from attnkit.kernels.window import window_attention

    return window_attention(query, key, value, left=mask.left, right=mask.right,
                            scale=_dot_scale(query, score, scale), return_weights=return_weights)


# ---- block-sparse ---------------------------------------------------------------------------------------------

def _blocksparse_supports(*, mask=None, **request) -> str | None:
    reason = _softmax_dot_reason(**request)
    if reason:
        return reason
    if mask is None or isinstance(mask, _masks.Full):
        return "there is no mask, so no tile can be skipped; use backend='sdpa'"
    return None


def _blocksparse_run(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights):
    from attnkit.kernels.blocksparse import blocksparse_attention

    return blocksparse_attention(query, key, value, mask, scale=_dot_scale(query, score, scale), block=_TILE,
                                 return_weights=return_weights)


# ---- graph ----------------------------------------------------------------------------------------------------

def _graph_supports(*, mask=None, **request) -> str | None:
    reason = _softmax_dot_reason(**request)
    if reason:
        return reason
    if not isinstance(mask, _masks.Graph):
        return f"it needs a graph mask (masks.graph(edge_index, num_nodes=N)); got {mask!r}"
    return None


def _unique_edges(ei: Tensor, N: int) -> Tensor:
    """A dense mask counts an edge once: drop duplicate edges so both agree. Sorted by destination, which the
    graph kernel then uses as is. ``(2, E)`` sources, destinations."""
    flat = torch.unique(ei[1] * max(N, 1) + ei[0])  # (E,): 1-D unique is much faster than unique(dim=1)
    return torch.stack([flat % max(N, 1), flat // max(N, 1)])


def _graph_run(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights):
    from attnkit.kernels.graph import graph_attention

    N = query.shape[-2]
    mask._check_size(N, key.shape[-2])
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
    nb = math.prod(batch)
    D, Dv = query.shape[-1], value.shape[-1]
    q = query.expand(*batch, N, D).reshape(nb, N, D).transpose(0, 1)  # (N, nb, D)
    k = key.expand(*batch, N, D).reshape(nb, N, D).transpose(0, 1)  # (N, nb, D)
    v = value.expand(*batch, N, Dv).reshape(nb, N, Dv).transpose(0, 1)  # (N, nb, Dv)
    edge_index = cached_on_mask(mask, "_attnkit_edges", ("edges", N, str(query.device)),
                                lambda: _unique_edges(mask.edge_index.to(query.device), N))  # (2, E)
    out, w = graph_attention(q, k, v, edge_index, scale=_dot_scale(query, score, scale), return_weights=True)
    out = out.transpose(0, 1).reshape(*batch, N, Dv)  # (*b, N, Dv)
    if not return_weights:
        return out
    dense = w.new_zeros(nb, N, N)
    dense = dense.index_put((torch.arange(nb, device=w.device).view(-1, 1), edge_index[1], edge_index[0]),
                            w.transpose(0, 1), accumulate=True)  # (nb, N, N): row = query i, column = key j
    return out, dense.reshape(*batch, N, N)


# ---- chunked --------------------------------------------------------------------------------------------------

def _chunked_supports(*, normalize, dropout_p, **_) -> str | None:
    if normalize != "softmax":
        return "its online softmax serves normalize='softmax' only; use backend='math'"
    if dropout_p > 0:
        return "it has no dropout on the weights; use backend='math'"
    return None


def _chunked_run(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights):
    from attnkit.kernels.chunked import chunked_attention

    return chunked_attention(query, key, value, score=score, mask=mask, bias=bias, scale=scale,
                             return_weights=return_weights)


# name -> (implementation, supports(**request) -> None | reason it cannot)
BACKENDS = {
    "math": (math_attention, _always),
    "sdpa": (sdpa_attention, sdpa_supports),
    "window": (_window_run, _window_supports),
    "blocksparse": (_blocksparse_run, _blocksparse_supports),
    "graph": (_graph_run, _graph_supports),
    "chunked": (_chunked_run, _chunked_supports),
}


def _tile_density(mask, L: int, S: int, device) -> float:
    from attnkit.kernels.blocksparse import cached_block_mask

    tiles = cached_block_mask(mask, L, S, _TILE, device)
    return float(tiles.float().mean()) if tiles.numel() else 1.0


def choose(query, key, value, **request) -> str:
    """Name of the backend ``backend="auto"`` uses for this request (see the module docstring)."""
    mask = request.get("mask")
    L, S = query.shape[-2], key.shape[-2]
    plain = (_masks.Full, _masks.Padding)
    structured = mask is not None and not isinstance(mask, plain) and type(mask) is not _masks.Causal
    if structured and _softmax_dot_reason(**request) is None:
        if isinstance(mask, _masks.Graph):
            return "graph"
        if _window_supports(**request) is None:
            if L * S >= 256 * 256 and 4 * (mask.left + mask.right + 1) <= S:
                return "window"
        elif L * S >= (1024 * 1024 if isinstance(mask, _masks.Dense) else 512 * 512):
            if _tile_density(mask, L, S, query.device) <= 0.3:
                return "blocksparse"
    if sdpa_supports(**request) is None:
        return "sdpa"
    if L * S >= 512 * 512 and _chunked_supports(**request) is None:
        return "chunked"
    return "math"


def validate(name: str, query, key, value, **request) -> str:
    """Return ``name`` if that backend can serve the request; raise ``ValueError`` saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}; got {name!r}.")
    reason = BACKENDS[name][1](query=query, key=key, value=value, **request)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this request: {reason}.")
    return name


def run(name: str, query, key, value, **kwargs):
    """Run backend ``name``."""
    return BACKENDS[name][0](query, key, value, **kwargs)
