"""Structured attention masks. One meaning everywhere: True = the query may attend to the key.

A mask is a small object that *describes* which (query, key) pairs are allowed and can materialize that as a
dense boolean tensor. Because the structure is kept (a window's widths, a graph's edge list, which blocks hold
anything), kernels can skip what is empty instead of paying for all ``L x S`` pairs.

====================  ======================================================================================
``full()``            every pair
``causal()``          key ``j`` is allowed for query ``i`` iff ``j <= i + (S - L)`` (bottom-right aligned, as
                      FlashAttention >= 2.1: the last query sees every key; with ``L > S`` the first
                      ``L - S`` queries see nothing and get zero output)
``padding(lengths)``  keys ``j < lengths[b]`` (``lengths`` ``(B,)``), or ``j < lengths[b, i]`` per query
                      (``(B, L)``): d2l's ``valid_lens``
``window(l, r)``      ``i' - l <= j <= i' + r`` with ``i' = i + (S - L)``; widths are inclusive, so
                      ``window(w, 0)`` sees ``w + 1`` keys: truncated self-attention (speech)
``graph(...)``        query ``i`` sees key ``j`` iff there is an edge ``j -> i`` (``edge_index[0]`` = source,
                      ``edge_index[1]`` = target, as PyTorch Geometric), or ``adjacency[i, j]`` is True
``dense(t)``          any boolean tensor broadcastable to the scores
``a & b``, ``a | b``  both / either; ``~a`` the pairs ``a`` forbids
``causal(align=)``    ``"top_left"``: ``j <= i`` whatever ``S - L`` (FlexAttention's ``q_idx >= kv_idx``)
``documents(...)``    packed sequences: same document only (from lengths or per-position ids)
``prefix_lm(n)``      bidirectional over the first ``n[b]`` keys, causal after them
``neighborhood(..)``  2-D ``k x k`` neighbourhood over an ``H x W`` grid (NATTEN), dilation, causal
``mask_mod(fn)``      any ``fn(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's ``mask_mod``)
====================  ======================================================================================

Every mask answers the kernels' questions itself (``materialize``, ``allowed`` on index tiles, ``tile_states``,
``plan`` -> :class:`BlockMask`, ``unused_keys``, ``check``): see :mod:`attnkit.masks._base`. ``mask.offset(q0,
k0, L=, S=)`` is the same mask seen from a shard of a longer sequence.

Shapes: ``materialize(L, S)`` returns ``(L, S)`` for masks that are the same for every batch element and
``(B, 1, ..., 1, L, S)`` for batched masks (padding), with ``batch_ndim`` leading dims so that it broadcasts
against scores ``(B, L, S)`` (``batch_ndim=1``) or ``(B, H, L, S)`` (``batch_ndim=2``). ``dense`` tensors keep
their own shape and broadcast from the right, like any PyTorch mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from attnkit.masks._base import EMPTY, FULL, PARTIAL, Mask
from attnkit.masks._functions import Documents, MaskMod, Neighborhood, documents, from_torch_block_mask
from attnkit.masks._plan import BlockMask, Group, allowed_on
from attnkit.masks._structured import (
    And,
    Causal,
    Dense,
    Full,
    Graph,
    Not,
    Offset,
    Or,
    Padding,
    Window,
    as_mask,
)

__all__ = [
    "Mask", "Full", "Causal", "Padding", "Window", "Graph", "Dense", "And", "Or", "Not", "Offset", "MaskMod",
    "Documents", "Neighborhood", "BlockMask", "Group", "EMPTY", "PARTIAL", "FULL",
    "full", "causal", "padding", "window", "graph", "dense", "documents", "prefix_lm", "neighborhood", "mask_mod",
    "as_mask", "materialize", "allowed_on", "from_torch_block_mask",
]


def full() -> Full:
    """Every pair allowed."""
    return Full()


def causal(*, align: str = "bottom_right") -> Causal:
    """Causal mask: query ``i`` sees keys ``j <= i + S - L`` (bottom-right) or ``j <= i`` (``align="top_left"``)."""
    return Causal(align=align)


def padding(lengths: Tensor | Sequence[int]) -> Padding:
    """Key padding from valid lengths ``(B,)`` or per-query ``(B, L)`` (d2l's ``valid_lens``)."""
    return Padding(lengths)


def window(left: int | None, right: int | None = 0, *, align: str = "bottom_right") -> Window:
    """Truncated attention: ``left`` keys before and ``right`` after the aligned diagonal (inclusive)."""
    return Window(left, right, align=align)


def graph(edge_index: Tensor | None = None, *, num_nodes: int | None = None, adjacency: Tensor | None = None,
          add_self_loops: bool = False) -> Graph:
    """Attend only along edges (``edge_index`` ``(2, E)`` source -> target, or dense ``adjacency`` ``(N, N)``)."""
    return Graph(edge_index, num_nodes=num_nodes, adjacency=adjacency, add_self_loops=add_self_loops)


def dense(tensor: Tensor) -> Dense:
    """Wrap a boolean tensor (True = may attend)."""
    return Dense(tensor)


def prefix_lm(prefix_lengths: Tensor | Sequence[int]) -> Mask:
    """Prefix-LM: every query sees the first ``prefix_lengths[b]`` keys (bidirectional prefix) and is causal
    (top-left) after them: ``causal(align="top_left") | padding(prefix_lengths)``."""
    return Or(Causal(align="top_left"), Padding(prefix_lengths))


def neighborhood(height: int, width: int, kernel: int | tuple[int, int], *, dilation: int | tuple[int, int] = 1,
                 causal: bool = False, shift: bool = True) -> Neighborhood:
    """2-D neighbourhood attention (NATTEN) over a ``height x width`` grid flattened row-major (``shift=False``:
    truncated at the borders, a 'same'-padded convolution's receptive field)."""
    return Neighborhood(height, width, kernel, dilation=dilation, causal=causal, shift=shift)


def mask_mod(fn: Callable, B: int | None = None, H: int | None = None) -> MaskMod:
    """A mask from FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (B/H of None = the same for all)."""
    return MaskMod(fn, B, H)


def materialize(mask: Mask | Tensor, L: int, S: int, *, device=None, batch_ndim: int = 1) -> Tensor:
    """Dense boolean form of ``mask`` for scores ``(..., L, S)`` (see the module docstring for shapes)."""
    return as_mask(mask).materialize(L, S, device=device, batch_ndim=batch_ndim)
