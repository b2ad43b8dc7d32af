"""Benchmark cases: each pairs attnkit's path with its anchors on the same inputs (issue 5's settings).

Every case runs float32 with B=1, H=8, D=64 unless its note says otherwise (``--quick`` shrinks all sizes).
A :class:`Case` holds *factories*: ``impls[name]()`` builds the inputs (seeded) and returns a closure that runs
one call, so the same case can be rebuilt in a child process to measure its memory. ``flops`` is the work the
case *needs* (allowed pairs only): forward ``4 * B * H * pairs * D`` (Q K^T and P V), forward+backward three
times that (dQ, dK, dV, dP add four matmuls of the same size); additive ``B * L * S * (4 * hidden + 2 * Dv)``
(add, tanh, w_v dot, P V); anchors that compute more pairs show a lower GFLOP/s on purpose.

Anchors: ``sdpa`` (``F.scaled_dot_product_attention``, with the dense boolean mask where there is a mask),
``math`` (attnkit's plain path, ``backend="math"``: scores -> softmax -> weights @ V), and those of
:mod:`attnkit.bench.anchors`: ``flex`` (compiled FlexAttention forward, compile time reported apart),
``local_attention`` (lucidrains), ``gatconv`` (PyTorch Geometric), ``broadcast`` (lean broadcast additive).
``role`` names the issue-5 target a case serves (see :mod:`attnkit.bench.targets`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnkit import masks
from attnkit.bench import anchors
from attnkit.bench.anchors import _qkv, _runner
from attnkit.functional import scores
from attnkit.functional.attention import attention
from attnkit.kernels import dispatch

Factory = Callable[[], Callable[[], object]]
COMPILE_TIMES = anchors.COMPILE_TIMES  # kept here for callers of the old name


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
    role: str = ""  # the issue-5 target this case serves (attnkit.bench.targets)
    check: Callable[[], dict] | None = None  # extra measured facts (e.g. an agreement), stored with the case
    extra: dict = field(default_factory=dict)


def _pairs(mask: masks.Mask | None, L: int, S: int) -> int:
    if mask is None:
        return L * S
    if mask.window() is not None:
        left, right = mask.window()
        i = torch.arange(L) + (S - L)
        lo, hi = (i - left).clamp(min=0), (i + right).clamp(max=S - 1)
        return int((hi - lo + 1).clamp(min=0).sum())
    if L == S and mask.edges(L) is not None:
        return int(torch.unique(mask.edges(L), dim=1).shape[1])
    return int(mask.materialize(L, S).sum())


def _auto(q, k, v, **kw) -> str:
    req = dict(score=scores.scaled_dot, score_mod=None, mask=None, bias=None, normalize="softmax", scale=None,
               dropout_p=0.0, return_weights=False, return_lse=False)
    req.update(kw)
    if req["mask"] is not None:
        req["mask"] = masks.as_mask(req["mask"])
    return dispatch.choose(q, k, v, **req)


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


def cora_sized_graph(N: int, E: int, seed: int = 3) -> torch.Tensor:
    """A random undirected graph with Cora's shape: E / 2 distinct node pairs (no self loops), both directions.

    Shape:
        -> edge_index (2, E), row 0 = source, row 1 = target.
    """
    g = torch.Generator().manual_seed(seed)
    pairs = torch.empty(0, dtype=torch.long)
    while pairs.numel() < E // 2:
        a, b = torch.randint(0, N, (2, E), generator=g)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        new = (lo * N + hi)[lo != hi]
        pairs = torch.cat([pairs, new[~torch.isin(new, pairs)].unique()])
    pairs = pairs[torch.randperm(pairs.numel(), generator=g)[: E // 2]]
    src, dst = pairs // N, pairs % N
    return torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])  # (2, E)


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
    }, flops(Ld * Ld, "fwd"), _auto(*q0), role="dense"))
    cases.append(Case(f"causal-L{Ld}", "causal", Ld, "fwd", {
        "attnkit": _attn_factory(B, H, Ld, Ld, D, "fwd", mask=masks.causal()),
        "sdpa": _sdpa_factory(B, H, Ld, Ld, D, "fwd", is_causal=True),
    }, flops(Ld * (Ld + 1) // 2, "fwd"), _auto(*q0, mask=masks.causal()), role="causal"))

    # sliding window left = right = w; the targets are at L_main (fwd, fwd+bwd) and L_long (fwd+bwd)
    w = 32 if quick else 128
    lengths = [256, 512, 1024, 4096] if quick else [1024, 4096, 16384, 65536]
    L_main, L_long = lengths[-2], lengths[-1]
    for L in lengths:
        win = masks.window(w, w)
        qw = _qkv(1, 1, L, L, 1, grad=False)
        pairs = _pairs(win, L, L)
        for mode in ("fwd", "fwd+bwd"):
            impls = {"attnkit": _attn_factory(B, H, L, L, D, mode, mask=win)}
            if L <= L_main:
                impls["sdpa"] = _sdpa_factory(B, H, L, L, D, mode, mask=win)
            if L <= lengths[1]:
                impls["math"] = _attn_factory(B, H, L, L, D, mode, mask=win, backend="math")
            if L in lengths[1:3]:
                impls["local_attention"] = anchors.local_attention_factory(B, H, L, D, w, mode)
            cid = f"window{w}-L{L}-{mode}"
            if flex and not quick and mode == "fwd" and L in lengths[1:3]:
                impls["flex"] = anchors.flex_factory(cid, B, H, L, D, anchors.window_mask_mod(w))
            memory = ()
            if mode == "fwd+bwd" and L >= L_main:  # one child process per impl (--quick: attnkit only)
                memory = tuple(m for m in ("attnkit", "sdpa", "local_attention") if m in impls and not
                               (quick and m != "attnkit"))
            role = {(L_main, "fwd"): "window_fwd", (L_main, "fwd+bwd"): "window_fwdbwd",
                    (L_long, "fwd"): "window_fwd_long", (L_long, "fwd+bwd"): "window_fwdbwd_long"}.get((L, mode), "")
            cases.append(Case(cid, f"window{w}-{mode}", L, mode, impls, flops(pairs, mode),
                              _auto(*qw, mask=win), memory, role=role))
    # linear growth is a ratio, so its two lengths are timed interleaved in one case (two cases timed minutes
    # apart would also measure how the shared machine's speed drifted in between)
    win = masks.window(w, w)
    cases.append(Case(f"window{w}-scaling-fwd+bwd", f"window{w}-scaling", L_long, "fwd+bwd", {
        f"attnkit_L{L}": _attn_factory(B, H, L, L, D, "fwd+bwd", mask=win) for L in (L_main, L_long)
    }, backend=_auto(*_qkv(1, 1, L_long, L_long, 1, grad=False), mask=win),
        note=f"L={L_main} and L={L_long} interleaved: their time ratio is the linear-growth target",
        role="window_scaling", extra={"lengths": (L_main, L_long)}))

    # block-sparse: random 10 % of 128 x 128 tiles, vs dense attention (SDPA, no mask) of the same length
    Lb = 1024 if quick else 8192
    g = torch.Generator().manual_seed(0)
    nt = Lb // 128
    tiles = torch.rand(nt, nt, generator=g) < 0.1
    tiles[0, 0] = True
    bmask = masks.dense(tiles.repeat_interleave(128, 0).repeat_interleave(128, 1))
    qb = _qkv(1, 1, Lb, Lb, 1, grad=False)
    for mode in ("fwd", "fwd+bwd"):
        cases.append(Case(f"blocksparse10-L{Lb}-{mode}", f"blocksparse10-{mode}", Lb, mode, {
            "attnkit": _attn_factory(B, H, Lb, Lb, D, mode, mask=bmask),
            "sdpa": _sdpa_factory(B, H, Lb, Lb, D, mode, mask=bmask),
            "sdpa_nomask": _sdpa_factory(B, H, Lb, Lb, D, mode),
        }, flops(int(tiles.sum()) * 128 * 128, mode), _auto(*qb, mask=bmask),
            note=f"{int(tiles.sum())} of {nt * nt} tiles ({float(tiles.float().mean()):.1%}); sdpa_nomask = dense",
            role="blocksparse" if mode == "fwd" else ""))

    cases.append(_additive_case(quick))
    cases.append(_graph_case(quick))
    cases.extend(_linear_cases(quick, B, H, D))
    from attnkit.bench.cases_flex import flex_cases

    cases.extend(flex_cases(quick, with_flex=flex))
    from attnkit.bench.cases_hf import hf_cases

    cases.extend(hf_cases(quick))
    from attnkit.bench.cases_native import native_cases  # issue 16

    cases.extend(native_cases(quick, with_flex=flex))
    return cases


def _additive_case(quick: bool) -> Case:
    """Additive (Bahdanau) attention, one head: chunked online softmax vs the broadcast (B, L, S, hidden) forms.

    Forward only: the issue's line names no backward, and the broadcast forward+backward at B=4 would hold
    about 24 GiB. One head (B, L, D): with H=8 the broadcast tensor alone would be 64 GiB.
    """
    Ba, La, hidden, Da = (2, 128, 16, 16) if quick else (4, 2048, 128, 64)
    ga = torch.Generator().manual_seed(1)
    w_q, w_k = (torch.randn(hidden, Da, generator=ga) / Da**0.5 for _ in range(2))
    w_v = torch.randn(hidden, generator=ga)
    add = functools.partial(scores.additive, w_q=w_q, w_k=w_k, w_v=w_v)

    def inputs():
        gg = torch.Generator().manual_seed(2)
        return [torch.randn(Ba, La, Da, generator=gg) for _ in range(3)]

    def attn_factory(backend):
        return lambda: _runner(lambda a, b, c: attention(a, b, c, score=add, backend=backend), inputs(), "fwd")

    def broadcast_factory():
        return _runner(lambda a, b, c: anchors.additive_broadcast(a, b, c, w_q, w_k, w_v), inputs(), "fwd")
    qa = [torch.zeros(Ba, La, Da)] * 3
    return Case(f"additive-h{hidden}-L{La}-B{Ba}-fwd", "additive", La, "fwd", {
        "attnkit": attn_factory("auto"), "math": attn_factory("math"), "broadcast": broadcast_factory,
    }, float(Ba * La * La * (4 * hidden + 2 * Da)), _auto(*qa, score=add), ("attnkit", "math", "broadcast"),
        note=f"B={Ba}, one head, D={Da}, fwd; math = attnkit broadcast path, broadcast = lean (tanh in place)",
        role="additive")


def _graph_case(quick: bool) -> Case:
    """Graph attention on a random graph of Cora's size, forward+backward, 8 heads of 8."""
    N, E, Hg, Dg = (200, 800, 2, 8) if quick else (2708, 10556, 8, 8)
    ei = cora_sized_graph(N, E)
    gmask = masks.graph(ei, num_nodes=N)
    qg = _qkv(1, 1, N, N, 1, grad=False)
    return Case(f"graph-N{N}-E{E}-fwd+bwd", "graph", N, "fwd+bwd", {
        "attnkit": _attn_factory(1, Hg, N, N, Dg, "fwd+bwd", mask=gmask),
        "sdpa": _sdpa_factory(1, Hg, N, N, Dg, "fwd+bwd", mask=gmask),
        "gatconv": anchors.gatconv_factory(N, ei, Hg, Dg),
    }, 4.0 * Hg * _pairs(gmask, N, N) * Dg * 3, _auto(*qg, mask=gmask),
        note=f"random undirected graph, {N} nodes, {E} edges, H={Hg}, D={Dg}; gatconv = whole GATConv layer",
        role="graph")


def _linear_cases(quick: bool, B: int, H: int, D: int) -> list[Case]:
    """Causal linear attention vs causal SDPA, and the recurrent step's cost at position L vs position 1."""
    Ll = 512 if quick else 16384
    steps = 64

    def linear_factory():
        from attnkit.kernels.linear import linear_attention

        q, k, v = _qkv(B, H, Ll, Ll, D, grad=False)
        return _runner(lambda a, b, c: linear_attention(a, b, c, causal=True), [q, k, v], "fwd")

    def step_factory(position):
        def make():
            from attnkit.kernels.linear import elu_feature_map, linear_attention_step

            g2 = torch.Generator().manual_seed(4)
            k, v = (torch.randn(B, H, position, D, generator=g2) for _ in range(2))
            phi_k = elu_feature_map(k)
            state0 = (phi_k.transpose(-1, -2) @ v, phi_k.sum(-2))  # (S, z) after `position` tokens
            xs = torch.randn(steps, 3, B, H, D, generator=g2)

            def run():  # `steps` tokens from `position` on (one token is too short to time alone)
                state = state0
                with torch.no_grad():
                    for x in xs:
                        _, state = linear_attention_step(x[0], x[1], x[2], state)
            return run
        return make

    def recurrent_vs_parallel() -> dict:
        from attnkit.kernels.linear import linear_attention, linear_attention_step

        q, k, v = _qkv(B, H, 256, 256, D, grad=False, seed=5)
        par = linear_attention(q, k, v, causal=True)
        state, rec = None, []
        for t in range(q.shape[-2]):
            o, state = linear_attention_step(q[..., t, :], k[..., t, :], v[..., t, :], state)
            rec.append(o)
        return {"recurrent_vs_parallel_max_abs": float((torch.stack(rec, -2) - par).abs().max()), "tokens": 256}

    return [
        Case(f"linear-causal-L{Ll}", "linear", Ll, "fwd", {
            "attnkit": linear_factory, "sdpa": _sdpa_factory(B, H, Ll, Ll, D, "fwd", is_causal=True),
        }, 4.0 * B * H * Ll * D * D, "linear", note="attnkit = linear attention (a different function)",
            role="linear"),
        Case(f"linear-step-L{Ll}", "linear-step", Ll, "fwd", {
            "attnkit": step_factory(Ll), "step_at_1": step_factory(1),
        }, None, "linear", note=f"recurrent form: {steps} tokens from position L vs from position 1",
            role="linear_step", check=recurrent_vs_parallel),
    ]


def find_case(case_id: str, quick: bool) -> Case:
    for case in build_cases(quick, flex=False):
        if case.id == case_id:
            return case
    raise KeyError(case_id)
