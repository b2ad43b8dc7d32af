"""Issue 5's "Done when" lines, judged from one bench run's measured numbers: PASS, MISS or SKIP.

Each target reads the cases by ``role`` (see :mod:`attnkit.bench.cases`) and compares the times (or peak
memories) it finds there with the issue's threshold. Nothing is hard-coded but the thresholds: a case that did
not run (``--only``) or an anchor that could not run here gives SKIP with the reason, never PASS.

A time ratio is the median of the per-round ratios (:func:`_ratio`): the implementations of a case run
round-robin, so the two samples of one round were taken back to back on the same machine state, while the
medians of the two series can fall in different phases of a drifting machine (in one full run on the shared
machine attnkit's dense path, which is SDPA itself, read 1.094 x SDPA as a ratio of medians, with per-round
ratios 0.96-1.10 and their median 1.01). With fewer than three common rounds (multi-second anchors) it is the
ratio of the medians. Every verdict line shows both.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

_MIN_PAIRS = 3  # common rounds needed for the paired ratio

PASS, MISS, SKIP = "PASS", "MISS", "SKIP"


class _Skip(Exception):
    pass


def _case(by_role: dict, role: str) -> dict:
    if role not in by_role:
        raise _Skip(f"case '{role}' not run")
    return by_role[role]


def _time(case: dict, impl: str) -> float:
    r = case["impls"].get(impl)
    if r is None:
        raise _Skip(f"{impl} not in {case['id']}")
    if r.get("median_s") is None:
        raise _Skip(f"{impl} did not run: {r.get('error', 'no time')}")
    return r["median_s"]


def _ratio(case: dict, num: str, den: str) -> tuple[float, str]:
    """time(num) / time(den) and how it was taken: the median over the rounds both ran in of the per-round ratio,
    or the ratio of the two medians when they share fewer than ``_MIN_PAIRS`` rounds."""
    a, b = _time(case, num), _time(case, den)
    ra, rb = case["impls"][num], case["impls"][den]
    pa = dict(zip(ra.get("rounds") or [], ra.get("times") or [], strict=False))
    pb = dict(zip(rb.get("rounds") or [], rb.get("times") or [], strict=False))
    common = sorted((set(pa) & set(pb)) - {-1})
    if len(common) >= _MIN_PAIRS:
        r = statistics.median(pa[i] / pb[i] for i in common)
        return r, f"paired median of {len(common)} rounds; ratio of medians {a / b:.3g}"
    return a / b, "ratio of medians"


def _memory(case: dict, impl: str) -> float:
    r = case["impls"].get(impl) or {}
    if r.get("peak_mb") is None:
        raise _Skip(f"peak memory of {case['id']}/{impl} not measured")
    return r["peak_mb"] * 2**20  # bytes


def _faster(role: str, anchor: str, need: float) -> Callable[[dict], tuple[bool, str]]:
    """attnkit at least ``need`` times faster than ``anchor``."""
    def judge(by_role):
        case = _case(by_role, role)
        x, how = _ratio(case, anchor, "attnkit")
        extra = ""
        r = case["impls"][anchor]
        if r.get("compile_s") is not None:
            extra = f"; its compile {r['compile_s']:.1f} s not counted"
        return x >= need, f"{anchor} / attnkit time = {x:.1f} ({how}; needs >= {need:g}; {case['id']}{extra})"
    return judge


def _dense_causal(by_role):
    parts, ok = [], True
    for role in ("dense", "causal"):
        case = _case(by_role, role)
        r, how = _ratio(case, "attnkit", "sdpa")
        ok &= r <= 1.05
        parts.append(f"{role} {r:.3f} ({how}; {case['id']})")
    return ok, "attnkit / sdpa time: " + ", ".join(parts) + " (needs <= 1.05)"


def _window_memory(by_role):
    case = _case(by_role, "window_fwdbwd_long")
    mem = _memory(case, "attnkit")
    return mem < 2e9, f"peak {mem / 1e9:.2f} GB (needs < 2 GB; {case['id']})"


def _window_linear(by_role):
    """From the case that times both lengths interleaved (impls ``attnkit_L<n>``); without it (a ``--only`` run),
    from the two separately timed cases, said so."""
    if "window_scaling" in by_role:
        case = by_role["window_scaling"]
        lengths = sorted(int(name.rsplit("_L", 1)[1]) for name in case["impls"] if name.startswith("attnkit_L"))
        if len(lengths) != 2:
            raise _Skip(f"{case['id']} needs two attnkit_L<n> timings")
        main, long = lengths
        r, how = _ratio(case, f"attnkit_L{long}", f"attnkit_L{main}")
        how = f"interleaved, {how}"
    else:
        lc, mc = _case(by_role, "window_fwdbwd_long"), _case(by_role, "window_fwdbwd")
        main, long = mc["L"], lc["L"]
        r = _time(lc, "attnkit") / _time(mc, "attnkit")
        how = "separate cases"
    return r <= 4.5, f"time L={long} / L={main} = {r:.2f}, {how} (needs <= 4.5; L ratio {long // main})"


def _blocksparse(by_role):
    case = _case(by_role, "blocksparse")
    r, how = _ratio(case, "attnkit", "sdpa_nomask")
    return r <= 0.2, f"attnkit / dense (sdpa_nomask) time = {r:.3f} ({how}; needs <= 0.2; {case['id']})"


def _broadcasts(case: dict) -> list[str]:
    names = [n for n in ("broadcast", "math") if n in case["impls"]]
    if not names:
        raise _Skip(f"no broadcast anchor in {case['id']}")
    return names


def _additive_memory(by_role):
    case = _case(by_role, "additive")
    mine = _memory(case, "attnkit")
    found = {}
    for name in _broadcasts(case):
        try:
            found[name] = _memory(case, name)
        except _Skip:
            pass
    if not found:
        raise _Skip(f"peak memory of the broadcast anchors of {case['id']} not measured")
    ratios = {n: mine / m for n, m in found.items()}
    text = ", ".join(f"{r:.4f} x {n}'s {found[n] / 2**20:.0f} MB" for n, r in ratios.items())
    return max(ratios.values()) <= 0.1, f"attnkit {mine / 2**20:.1f} MB = {text} (needs <= 0.1; {case['id']})"


def _additive_time(by_role):
    case = _case(by_role, "additive")
    found = {}
    for name in _broadcasts(case):
        try:
            found[name] = _ratio(case, "attnkit", name)
        except _Skip:
            pass
    if not found:
        raise _Skip(f"no broadcast anchor of {case['id']} ran")
    ratios = {n: r for n, (r, _) in found.items()}
    text = ", ".join(f"{r:.2f} ({n}, {how})" for n, (r, how) in found.items())
    return max(ratios.values()) <= 1.0, f"attnkit / broadcast time = {text} (needs <= 1; {case['id']})"


def _graph_gat(by_role):
    case = _case(by_role, "graph")
    r, how = _ratio(case, "attnkit", "gatconv")
    return r <= 1.5, f"attnkit / gatconv time = {r:.2f} ({how}; needs <= 1.5; {case['id']})"


def _recurrent_matches(by_role):
    case = _case(by_role, "linear_step")
    diff = (case.get("check") or {}).get("recurrent_vs_parallel_max_abs")
    if diff is None:
        raise _Skip(f"{case['id']} has no agreement check")
    return diff <= 1e-5, (f"max |recurrent - parallel| = {diff:.1e} over {case['check'].get('tokens')} tokens "
                          "(needs <= 1e-5)")


def _step_flat(by_role):
    case = _case(by_role, "linear_step")
    r, how = _ratio(case, "attnkit", "step_at_1")
    return r <= 1.25, f"step cost at position {case['L']} / at position 1 = {r:.2f} ({how}; needs <= 1.25)"


def _slower_at_most(role: str, anchor: str, most: float) -> Callable[[dict], tuple[bool, str]]:
    """attnkit's time at most ``most`` times ``anchor``'s."""
    def judge(by_role):
        case = _case(by_role, role)
        r, how = _ratio(case, "attnkit", anchor)
        return r <= most, f"attnkit / {anchor} time = {r:.2f} ({how}; needs <= {most:g}; {case['id']})"
    return judge


def _cbm_time(by_role):
    case = _case(by_role, "flex_cbm_Lmain")
    t = _time(case, "attnkit")
    extra = ""
    try:
        extra = f"; torch's create_block_mask {_time(case, 'torch'):.2f} s"
    except _Skip:
        pass
    return t < 1.0, f"{t:.3f} s (needs < 1 s; {case['id']}{extra})"


def _cbm_memory(by_role):
    case = _case(by_role, "flex_cbm_Llong")
    mem = _memory(case, "attnkit")
    L = case["L"]
    return mem < L * L / 10, (f"peak {mem / 2**20:.0f} MB against {L * L / 2**30:.1f} GiB for one bool per pair "
                              f"({_time(case, 'attnkit'):.2f} s; {case['id']})")


def _hf_memory(by_role):
    case = _case(by_role, "hf_prefill")
    a, s = _memory(case, "attnkit"), _memory(case, "sdpa")
    return a < 0.5 * s, f"peak {a / 2**20:.0f} MB vs sdpa {s / 2**20:.0f} MB = {a / s:.2f} (needs < 0.5; {case['id']})"


def _hf_train(by_role):
    case = _case(by_role, "hf_train")
    t = _time(case, "attnkit")
    flex = case["impls"].get("flex") or {}
    refused = flex.get("median_s") is None and "refuses" in (flex.get("error") or "")
    mem = case["impls"]["attnkit"].get("peak_mb")
    return refused, (f"attnkit {t:.2f} s" + (f", peak {mem:.0f} MB" if mem is not None else "")
                     + f"; flex: {flex.get('error', 'ran')} ({case['id']})")
# ---- issue 16: the compiled CPU tile kernel -------------------------------------------------------------------

def _native_case(by_role: dict, role: str) -> dict:
    case = _case(by_role, role)
    if "native" not in case["impls"] and case.get("backend") != "native":
        raise _Skip(f"{case['id']} does not run the native kernel")
    return case


def _rate_vs_dense(role: str, need: float) -> Callable[[dict], tuple[bool, str]]:
    """native's needed-work rate at least ``need`` x dense SDPA's (timed in the same case, same rounds)."""
    def judge(by_role):
        case = _native_case(by_role, role)
        extra = case.get("extra") or {}
        if "dense_flops" not in extra:
            raise _Skip(f"{case['id']} has no dense SDPA work recorded")
        r, how = _ratio(case, extra["dense"], "native")  # t_dense / t_native
        x = r * case["flops"] / extra["dense_flops"]
        rate = case["flops"] / _time(case, "native") / 1e9
        dense = extra["dense_flops"] / _time(case, extra["dense"]) / 1e9
        return x >= need, (f"native {rate:.0f} GFLOP/s needed work = {x:.2f} x {extra['dense']}'s {dense:.0f} "
                           f"({how}; needs >= {need:g}; {case['id']})")
    return judge


def _native_faster(role: str, anchor: str, need: float) -> Callable[[dict], tuple[bool, str]]:
    def judge(by_role):
        case = _native_case(by_role, role)
        x, how = _ratio(case, anchor, "native")
        r = case["impls"][anchor]
        extra = f"; its compile {r['compile_s']:.1f} s not counted" if r.get("compile_s") is not None else ""
        return x >= need, f"{anchor} / native time = {x:.2f} ({how}; needs >= {need:g}; {case['id']}{extra})"
    return judge


def _native_at_most(role: str, anchor: str, most: float) -> Callable[[dict], tuple[bool, str]]:
    def judge(by_role):
        case = _native_case(by_role, role)
        r, how = _ratio(case, "native", anchor)
        return r <= most, f"native / {anchor} time = {r:.3f} ({how}; needs <= {most:g}; {case['id']})"
    return judge


def _native_reported(role: str) -> Callable[[dict], tuple[bool, str]]:
    def judge(by_role):
        case = _native_case(by_role, role)
        t = _time(case, "native")
        parts = [f"native {t * 1e3:.0f} ms ({case['flops'] / t / 1e9:.0f} GFLOP/s)"]
        for name, r in case["impls"].items():
            if name != "native":
                parts.append(f"{name} {r['median_s'] * 1e3:.0f} ms" if r.get("median_s") else
                             f"{name}: {r.get('error', 'did not run')}")
        return True, "; ".join(parts) + f" ({case['id']})"
    return judge


def _busy(by_role):
    case = _native_case(by_role, "native_busy")
    mine, how = _ratio(case, "native_busy", "native")
    theirs, how2 = _ratio(case, "sdpa_busy", "sdpa")
    return mine <= 1.1 * theirs, (f"with one busy process native slows {mine:.2f}x, SDPA {theirs:.2f}x: "
                                  f"{mine / theirs:.2f} (needs <= 1.1; {how}; {case['id']})")


#: (issue 5's words, judge) in the issue's order; a judge returns (ok, what was measured) or raises _Skip
TARGETS: list[tuple[str, Callable[[dict], tuple[bool, str]] | None]] = [
    ("dense and causal: attnkit time <= 1.05 x SDPA's", _dense_causal),
    ("window 128 fwd L=16384: >= 1.5 x faster than FlexAttention compiled", _faster("window_fwd", "flex", 1.5)),
    ("window 128 fwd L=16384: >= 15 x faster than SDPA with a dense boolean mask", _faster("window_fwd", "sdpa", 15)),
    ("window 128 fwd+bwd L=16384: >= 25 x faster than SDPA's with a dense mask",
     _faster("window_fwdbwd", "sdpa", 25)),
    ("window 128 fwd+bwd L=65536: under 2 GB of peak memory", _window_memory),
    ("window 128 fwd+bwd: time L=65536 / L=16384 <= 4.5", _window_linear),
    ("block-sparse 10 % of 128x128 blocks, L=8192: time <= 0.2 x the dense time", _blocksparse),
    ("additive L=S=2048, hidden 128, B=4: peak memory <= 0.1 x a broadcast implementation's", _additive_memory),
    ("additive L=S=2048, hidden 128, B=4: not slower than a broadcast implementation", _additive_time),
    ("graph (Cora-sized) fwd+bwd: <= 1.5 x PyTorch Geometric's GATConv time", _graph_gat),
    ("graph (Cora-sized) fwd+bwd: >= 10 x faster than dense masked attention", _faster("graph", "sdpa", 10)),
    ("linear causal L=16384: >= 5 x faster than causal SDPA", _faster("linear", "sdpa", 5)),
    ("linear: recurrent form matches the parallel form to 1e-5", _recurrent_matches),
    ("linear: recurrent per-token cost does not grow with position", _step_flat),
    # issue 11: programmable attention
    ("[11] sliding window as a mask_mod, L=16384 fwd: <= 1.25 x masks.window's time",
     lambda r: _slower_at_most("flex_window_fwd", "window", 1.25)(r)),
    ("[11] sliding window as a mask_mod, L=16384 fwd+bwd: <= 1.25 x masks.window's time",
     lambda r: _slower_at_most("flex_window_fwdbwd", "window", 1.25)(r)),
    ("[11] 16 packed causal documents, L=16384 fwd+bwd: >= 10 x faster than SDPA with the dense mask",
     _faster("flex_docs_fwdbwd", "sdpa", 10)),
    ("[11] ALiBi score_mod, causal, L=8192 fwd+bwd: <= 2 x attnkit's plain causal time",
     lambda r: _slower_at_most("flex_alibi_fwdbwd", "causal", 2.0)(r)),
    ("[11] create_block_mask of a sliding window, L=16384: under 1 s", _cbm_time),
    ("[11] create_block_mask of a sliding window, L=65536: no L x S allocation (peak << 4.3 GB)", _cbm_memory),
    # issue 13: attnkit inside Hugging Face transformers
    ("[13] Mistral-shaped model, window 256, prefill L=16384: >= 3 x faster than transformers' sdpa",
     _faster("hf_prefill", "sdpa", 3)),
    ("[13] Mistral-shaped model, window 256, prefill L=16384: under half of sdpa's peak memory", _hf_memory),
    ("[13] Mistral-shaped model, training step L=8192: attnkit runs where flex_attention refuses", _hf_train),
    ("every kernel vs float64 reference, gradcheck, zero rows, non-finite rule (tests in CI)", None),
    # issue 16: the compiled CPU tile kernel (backend="native")
    ("[16] window 128/128 L=16384 fwd: needed-work rate >= 0.75 x dense SDPA's fwd (L=4096)",
     _rate_vs_dense("native_window_fwd", 0.75)),
    ("[16] window 128/128 L=16384 fwd+bwd: needed-work rate >= 0.65 x dense SDPA's fwd+bwd (L=4096)",
     _rate_vs_dense("native_window_fwdbwd", 0.65)),
    ("[16] window 128/128 L=16384 fwd: >= 1.5 x faster than FlexAttention compiled",
     _native_faster("native_window_fwd", "flex", 1.5)),
    ("[16] block-sparse 10 % L=8192 fwd: <= 0.13 x dense SDPA's time",
     _native_at_most("native_blocksparse_fwd", "sdpa_nomask", 0.13)),
    ("[16] block-sparse 10 % L=8192 fwd+bwd: <= 0.15 x dense SDPA's time",
     _native_at_most("native_blocksparse_fwdbwd", "sdpa_nomask", 0.15)),
    ("[16] 16 packed causal documents L=16384 fwd: >= 1.5 x faster than FlexAttention compiled",
     _native_faster("native_docs_fwd", "flex", 1.5)),
    ("[16] sliding-window mask_mod L=16384 fwd: >= 1.5 x faster than FlexAttention compiled",
     _native_faster("native_slidingmod_fwd", "flex", 1.5)),
    ("[16] 16 packed causal documents L=16384 fwd+bwd (reported; FlexAttention refuses)",
     _native_reported("native_docs_fwdbwd")),
    ("[16] sliding-window mask_mod L=16384 fwd+bwd (reported; FlexAttention refuses)",
     _native_reported("native_slidingmod_fwdbwd")),
    ("[16] one busy process: window's slowdown <= 1.1 x SDPA's", _busy),
]


def evaluate(results: list[dict]) -> list[dict]:
    """One ``{"target", "verdict", "measured"}`` per issue-5 target, from the bench's case results."""
    by_role = {c["role"]: c for c in results if c.get("role")}
    out = []
    for text, judge in TARGETS:
        if judge is None:
            out.append({"target": text, "verdict": "CI", "measured": "not a bench measurement: `make test`"})
            continue
        try:
            ok, measured = judge(by_role)
            verdict = PASS if ok else MISS
        except _Skip as why:
            verdict, measured = SKIP, str(why)
        out.append({"target": text, "verdict": verdict, "measured": measured})
    return out


def format_summary(verdicts: list[dict], *, quick: bool = False) -> str:
    """The PASS/MISS block printed under the table: one line per target, then the counts."""
    width = max(len(v["target"]) for v in verdicts)
    head = "Done when (issue 5; [11] = issue 11; [13] = issue 13; [16] = issue 16)"
    if quick:
        head += " -- judged at --quick sizes, NOT the issue's settings"
    lines = [head]
    for v in verdicts:
        lines.append(f"{v['verdict']:<4}  {v['target']:<{width}}  {v['measured']}")
    counts = {k: sum(v["verdict"] == k for v in verdicts) for k in (PASS, MISS, SKIP)}
    lines.append(f"targets: {counts[PASS]} PASS, {counts[MISS]} MISS, {counts[SKIP]} SKIP")
    return "\n".join(lines)
