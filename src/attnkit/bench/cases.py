"""Benchmark cases: each pairs attnkit's path with its anchors on the same inputs.

A :class:`Case` holds *factories*: ``impls[name]()`` builds the inputs (seeded) and returns a closure that runs
one call, so the same case can be rebuilt in a child process to measure its memory. ``flops`` is the work the
case *needs* (allowed pairs only): forward ``4 * B * H * pairs * D`` (Q K^T and P V), forward+backward three
times that (dQ, dK, dV, dP add four matmuls of the same size); anchors that compute more pairs show a lower
GFLOP/s on purpose.

Anchors: ``sdpa`` (``F.scaled_dot_product_attention``, with the dense boolean mask where there is a mask),
``math`` (attnkit's plain path, ``backend="math"``: scores -> softmax -> weights @ V), ``flex`` (compiled
FlexAttention forward, compile time reported apart, only when it compiles on this machine), ``gatconv``
(PyTorch Geometric, only where installed).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnkit import masks
from attnkit.functional import scores
from attnkit.functional.attention import attention
from attnkit.kernels import dispatch

Factory = Callable[[], Callable[[], object]]

#: compile seconds of the FlexAttention anchors, filled when their factories run
COMPILE_TIMES: dict[str, float] = {}


@dataclass
class Case:
    id: str
    group: str  # cases of one group differ only in L (one line of the plot)
    L: int
    mode: str  # "fwd" or "fwd+bwd"
    impls: dict[str, Factory]
    flops: float | None = None
    backend: str = ""  # what backend="auto" picks for attnkit
    memory: tuple[str, ...] = ()  # impls whose peak memory is measured
    note: str = ""
    extra: dict = field(default_factory=dict)


def _qkv(B, H, L, S, D, *, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, H, n, D, generator=g) for n in (L, S, S)]
    return [t.requires_grad_(grad) for t in ts]


def _runner(fn: Callable, inputs: list[torch.Tensor], mode: str) -> Callable[[], object]:
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    grad_out = {}

    def run_bwd():
        out = fn(*inputs)
        if "g" not in grad_out:
            grad_out["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, grad_out["g"])
    return run_bwd


def _pairs(mask: masks.Mask | None, L: int, S: int) -> int:
    if mask is None:
        return L * S
    if isinstance(mask, masks.Window):
        i = torch.arange(L) + (S - L)
        lo = (i - mask.left).clamp(min=0) if mask.left is not None else torch.zeros_like(i)
        hi = (i + mask.right).clamp(max=S - 1) if mask.right is not None else torch.full_like(i, S - 1)
        return int((hi - lo + 1).clamp(min=0).sum())
    if isinstance(mask, masks.Graph):
        return int(torch.unique(mask.edge_index, dim=1).shape[1])
    return int(mask.materialize(L, S).sum())


def _auto(q, k, v, **kw) -> str:
    req = dict(score=scores.scaled_dot, mask=None, bias=None, normalize="softmax", dropout_p=0.0,
               return_weights=False)
    req.update(kw)
    if req["mask"] is not None:
        req["mask"] = masks.as_mask(req["mask"])
    return dispatch.choose(q, k, v, **req)


def _flex_factory(case_id: str, B, H, L, D, mask_mod) -> Factory:
    def make():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = _qkv(B, H, L, L, D, grad=False)
        block_mask = create_block_mask(mask_mod, None, None, L, L, device="cpu")
        compiled = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(q, k, v, block_mask=block_mask)
        COMPILE_TIMES[case_id] = time.perf_counter() - t0
        return _runner(lambda a, b, c: compiled(a, b, c, block_mask=block_mask), [q, k, v], "fwd")
    return make


def _attn_factory(B, H, L, S, D, mode, **kw) -> Factory:
    def make():
        q, k, v = _qkv(B, H, L, S, D, grad=mode != "fwd")
        return _runner(lambda a, b, c: attention(a, b, c, **kw), [q, k, v], mode)
    return make


def _sdpa_factory(B, H, L, S, D, mode, *, mask: masks.Mask | None = None, is_causal=False) -> Factory:
    def make():
        q, k, v = _qkv(B, H, L, S, D, grad=mode != "fwd")
        dense = None if mask is None else mask.materialize(L, S)  # (L, S) bool, True = may attend
        return _runner(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense,
                                                                      is_causal=is_causal), [q, k, v], mode)
    return make


def build_cases(quick: bool, *, flex: bool = True) -> list[Case]:
    """All benchmark cases; ``quick`` shrinks every size so the whole run takes seconds."""
    B, H, D = (1, 2, 16) if quick else (1, 8, 64)
    cases: list[Case] = []
    fb = {"fwd": 1, "fwd+bwd": 3}

    def flops(pairs, mode, d=D, heads=H, batch=B):
        return 4.0 * batch * heads * pairs * d * fb[mode]

    # dense and causal: attnkit must cost what SDPA costs
    Ld = 256 if quick else 4096
    q0 = _qkv(B, H, Ld, Ld, D, grad=False)
    cases.append(Case(f"dense-L{Ld}", "dense", Ld, "fwd", {
        "attnkit": _attn_factory(B, H, Ld, Ld, D, "fwd"),
        "sdpa": _sdpa_factory(B, H, Ld, Ld, D, "fwd"),
        "math": _attn_factory(B, H, Ld, Ld, D, "fwd", backend="math"),
    }, flops(Ld * Ld, "fwd"), _auto(*q0)))
    cases.append(Case(f"causal-L{Ld}", "causal", Ld, "fwd", {
        "attnkit": _attn_factory(B, H, Ld, Ld, D, "fwd", mask=masks.causal()),
        "sdpa": _sdpa_factory(B, H, Ld, Ld, D, "fwd", is_causal=True),
    }, flops(Ld * (Ld + 1) // 2, "fwd"), _auto(*q0, mask=masks.causal())))

    # sliding window left = right = w
    w = 32 if quick else 128
    lengths = [256, 512, 1024] if quick else [1024, 4096, 16384, 65536]
    for L in lengths:
        win = masks.window(w, w)
        qw = _qkv(1, 1, L, L, 1, grad=False)
        pairs = _pairs(win, L, L)
        for mode in ("fwd", "fwd+bwd"):
            impls = {"attnkit": _attn_factory(B, H, L, L, D, mode, mask=win)}
            if L <= (1024 if quick else 16384):
                impls["sdpa"] = _sdpa_factory(B, H, L, L, D, mode, mask=win)
            if L <= (512 if quick else 4096):
                impls["math"] = _attn_factory(B, H, L, L, D, mode, mask=win, backend="math")
            cid = f"window{w}-L{L}-{mode}"
            if flex and mode == "fwd" and not quick and L in (4096, 16384):
                def mask_mod(b, h, qi, kj, w=w):
                    return (kj >= qi - w) & (kj <= qi + w)
                impls["flex"] = _flex_factory(cid, B, H, L, D, mask_mod)
            memory = ("attnkit", "sdpa") if (mode == "fwd+bwd" and L >= (1024 if quick else 16384)) else ()
            memory = tuple(m for m in memory if m in impls)
            cases.append(Case(cid, f"window{w}-{mode}", L, mode, impls, flops(pairs, mode),
                              _auto(*qw, mask=win), memory))

    # block-sparse: random 10 % of 128 x 128 tiles
    Lb = 1024 if quick else 8192
    g = torch.Generator().manual_seed(0)
    nt = Lb // 128
    tiles = torch.rand(nt, nt, generator=g) < 0.1
    tiles[0, 0] = True
    bmask = masks.dense(tiles.repeat_interleave(128, 0).repeat_interleave(128, 1))
    qb = _qkv(1, 1, Lb, Lb, 1, grad=False)
    cases.append(Case(f"blocksparse10-L{Lb}", "blocksparse10", Lb, "fwd", {
        "attnkit": _attn_factory(B, H, Lb, Lb, D, "fwd", mask=bmask),
        "sdpa": _sdpa_factory(B, H, Lb, Lb, D, "fwd", mask=bmask),
        "sdpa_nomask": _sdpa_factory(B, H, Lb, Lb, D, "fwd"),
    }, flops(int(tiles.sum()) * 128 * 128, "fwd"), _auto(*qb, mask=bmask),
        note=f"{int(tiles.sum())} of {nt * nt} tiles ({float(tiles.float().mean()):.1%})"))

    # additive attention (Bahdanau): chunked online softmax vs the broadcast (L, S, hidden) form
    Ba, La, hidden, Da = (2, 128, 16, 16) if quick else (1, 2048, 128, 64)
    ga = torch.Generator().manual_seed(1)
    w_q, w_k, w_v = (torch.randn(hidden, Da, generator=ga) / Da**0.5, torch.randn(hidden, Da, generator=ga) / Da**0.5,
                     torch.randn(hidden, generator=ga))
    add = functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)

    def add_factory(backend):
        def make():
            gg = torch.Generator().manual_seed(2)
            q, k, v = (torch.randn(Ba, La, Da, generator=gg) for _ in range(3))
            return _runner(lambda a, b, c: attention(a, b, c, score=add, backend=backend), [q, k, v], "fwd")
        return make
    qa = [torch.zeros(Ba, La, Da)] * 3
    cases.append(Case(f"additive-h{hidden}-L{La}-B{Ba}", "additive", La, "fwd", {
        "attnkit": add_factory("auto"), "math": add_factory("math"),
    }, None, _auto(*qa, score=add), ("attnkit", "math"),
        note="broadcast = attnkit math path (holds the (B, L, S, hidden) tensor)"))

    # graph attention on a Cora-sized random graph (2708 nodes, 10556 edges), 8 heads of 8
    N, E, Hg, Dg = (200, 800, 2, 8) if quick else (2708, 10556, 8, 8)
    gg = torch.Generator().manual_seed(3)
    ei = torch.stack([torch.randint(0, N, (E,), generator=gg), torch.randint(0, N, (E,), generator=gg)])
    gmask = masks.graph(ei, num_nodes=N)
    qg = _qkv(1, 1, N, N, 1, grad=False)
    gimpls = {
        "attnkit": _attn_factory(1, Hg, N, N, Dg, "fwd+bwd", mask=gmask),
        "sdpa": _sdpa_factory(1, Hg, N, N, Dg, "fwd+bwd", mask=gmask),
    }
    gat = _gatconv_factory(N, ei, Hg, Dg)
    if gat is not None:
        gimpls["gatconv"] = gat
    cases.append(Case(f"graph-N{N}-E{E}-fwd+bwd", "graph", N, "fwd+bwd", gimpls,
                      flops(_pairs(gmask, N, N), "fwd+bwd", d=Dg, heads=Hg), _auto(*qg, mask=gmask),
                      note="random graph with Cora's sizes" if not quick else "random graph"))

    # linear attention (causal) vs causal SDPA, and the recurrent step's cost at the start and at the end
    Ll = 512 if quick else 16384

    def linear_factory():
        from attnkit.kernels.linear import linear_attention

        q, k, v = _qkv(B, H, Ll, Ll, D, grad=False)
        return _runner(lambda a, b, c: linear_attention(a, b, c, causal=True), [q, k, v], "fwd")
    cases.append(Case(f"linear-causal-L{Ll}", "linear", Ll, "fwd", {
        "attnkit": linear_factory, "sdpa": _sdpa_factory(B, H, Ll, Ll, D, "fwd", is_causal=True),
    }, 4.0 * B * H * Ll * D * D, "linear", note="attnkit = linear attention (a different function)"))

    def step_factory(position):
        def make():
            from attnkit.kernels.linear import elu_feature_map, linear_attention_step

            g2 = torch.Generator().manual_seed(4)
            k, v = (torch.randn(B, H, position, D, generator=g2) for _ in range(2))
            phi_k = elu_feature_map(k)
            state = (phi_k.transpose(-1, -2) @ v, phi_k.sum(-2))  # (S, z) after `position` tokens
            x = [torch.randn(B, H, D, generator=g2) for _ in range(3)]
            return _runner(lambda a, b, c: linear_attention_step(a, b, c, state), x, "fwd")
        return make
    cases.append(Case(f"linear-step-L{Ll}", "linear-step", Ll, "fwd", {
        "attnkit": step_factory(Ll), "step_at_1": step_factory(1),
    }, None, "linear", note="recurrent form: one token with the state after L tokens vs after 1"))
    return cases


def _gatconv_factory(N, ei, H, D) -> Factory | None:
    try:
        from torch_geometric.nn import GATConv  # noqa: F401  (optional anchor, never a requirement)
    except ImportError:
        return None

    def make():
        from torch_geometric.nn import GATConv

        conv = GATConv(H * D, D, heads=H, add_self_loops=False)
        x = torch.randn(N, H * D, requires_grad=True)
        return lambda: torch.autograd.grad(conv(x, ei).sum(), [x])
    return make


def find_case(case_id: str, quick: bool) -> Case:
    for case in build_cases(quick, flex=False):
        if case.id == case_id:
            return case
    raise KeyError(case_id)
