"""The issue-5 PASS / MISS / SKIP summary, computed from fake bench results (no timing)."""

import copy

import pytest

from attnkit.bench import targets


def _case(role, cid, L=1, mode="fwd", check=None, **impls):
    entry = {"id": cid, "role": role, "L": L, "mode": mode, "impls": {}}
    for name, v in impls.items():
        t, mem = v if isinstance(v, tuple) else (v, None)
        entry["impls"][name] = {"median_s": t, "n": 3, **({"peak_mb": mem} if mem is not None else {})}
    if check is not None:
        entry["check"] = check
    return entry


def _all_pass():
    """Numbers that meet every threshold of issue 5 (each just inside its limit)."""
    return [
        _case("dense", "dense-L4096", attnkit=1.04, sdpa=1.0),
        _case("causal", "causal-L4096", attnkit=0.5, sdpa=0.5),
        _case("window_fwd", "w-16384-fwd", L=16384, attnkit=0.1, sdpa=1.6, flex=0.16),
        _case("window_fwdbwd", "w-16384-fb", L=16384, mode="fwd+bwd", attnkit=(0.4, 300), sdpa=(10.4, 4500)),
        _case("window_fwdbwd_long", "w-65536-fb", L=65536, mode="fwd+bwd", attnkit=(1.79, 1800)),
        _case("window_scaling", "w-scaling", L=65536, mode="fwd+bwd", attnkit_L16384=0.4, attnkit_L65536=1.79),
        _case("blocksparse", "bs", attnkit=0.19, sdpa_nomask=1.0, sdpa=2.0),
        _case("additive", "add", attnkit=(0.9, 10), math=(2.0, 16000), broadcast=(1.0, 8000)),
        _case("graph", "g", mode="fwd+bwd", attnkit=0.01, sdpa=0.2, gatconv=0.0067),
        _case("linear", "lin", attnkit=0.2, sdpa=1.0),
        _case("linear_step", "step", L=16384, attnkit=1.2, step_at_1=1.0,
              check={"recurrent_vs_parallel_max_abs": 3e-7, "tokens": 256}),
        _case("flex_window_fwd", "fw", L=16384, attnkit=0.24, window=0.2),
        _case("flex_window_fwdbwd", "fwb", L=16384, mode="fwd+bwd", attnkit=0.6, window=0.5),
        _case("flex_docs_fwdbwd", "fd", L=16384, mode="fwd+bwd", attnkit=0.5, sdpa=5.1),
        _case("flex_alibi_fwdbwd", "fa", L=8192, mode="fwd+bwd", attnkit=3.9, causal=2.0),
        _case("flex_cbm_Lmain", "cbm", L=16384, attnkit=0.9, torch=1.0),
        _case("flex_cbm_Llong", "cbml", L=65536, attnkit=(1.0, 400)),
        _case("hf_prefill", "hfp", L=16384, attnkit=(10.0, 440), sdpa=(31.0, 900)),
        _hf_train(),
        *_native_cases(),
    ]


def _native_cases():
    """Issue 16's cases, each just inside its limit."""
    def case(role, mode="fwd", flops=1.0, extra=None, **impls):
        c = _case(role, role, L=16384, mode=mode, **impls)
        c["flops"], c["backend"] = flops, "native"
        if extra is not None:
            c["extra"] = extra
        return c

    dense = {"dense": "sdpa_dense_L4096", "dense_flops": 1.0}
    window = case("native_window_fwd", native=0.1, sdpa_dense_L4096=0.076, flex=0.151, extra=dense)
    window["impls"]["flex"]["compile_s"] = 6.0
    return [
        window,
        case("native_window_fwdbwd", "fwd+bwd", native=0.1, sdpa_dense_L4096=0.066, extra=dense),
        case("native_blocksparse_fwd", native=0.129, sdpa_nomask=1.0),
        case("native_blocksparse_fwdbwd", "fwd+bwd", native=0.149, sdpa_nomask=1.0),
        case("native_docs_fwd", native=0.1, flex=0.151),
        case("native_docs_fwdbwd", "fwd+bwd", native=0.3, blocksparse=0.7),
        case("native_slidingmod_fwd", native=0.1, flex=0.151),
        case("native_slidingmod_fwdbwd", "fwd+bwd", native=0.3, blocksparse=0.8),
        case("native_busy", native=1.0, native_busy=1.54, sdpa=1.0, sdpa_busy=1.4),
    ]


def _hf_train():
    case = _case("hf_train", "hft", L=8192, mode="fwd+bwd", attnkit=(14.0, 3000))
    case["impls"]["flex"] = {"median_s": None, "error": "skipped: transformers' flex_attention refuses: 'no CPU bwd'"}
    return case


def _verdicts(results):
    return {v["target"]: v["verdict"] for v in targets.evaluate(results)}


def test_one_verdict_per_done_when_line_all_pass():
    out = targets.evaluate(_all_pass())
    assert len(out) == len(targets.TARGETS)
    ci = [v for v in out if v["verdict"] == "CI"]
    assert len(ci) == 1 and "tests in CI" in ci[0]["target"]
    assert [v["verdict"] for v in out if v is not ci[0]] == ["PASS"] * (len(out) - 1)
    text = targets.format_summary(out)
    assert text.splitlines()[-1] == f"targets: {len(out) - 1} PASS, 0 MISS, 0 SKIP"
    assert "needs >= 25" in text and "1.04" in text


@pytest.mark.parametrize("role, impl, value, words", [
    ("dense", "attnkit", 1.06, "dense and causal"),
    ("window_fwd", "flex", 0.14, "FlexAttention"),
    ("window_fwd", "sdpa", 1.4, "dense boolean mask"),
    ("window_fwdbwd", "sdpa", (9.9, 4500), "fwd+bwd L=16384"),
    ("window_fwdbwd_long", "attnkit", (1.79, 1908), "2 GB"),  # 1908 MiB = 2.0007e9 bytes
    ("window_scaling", "attnkit_L65536", 1.81, "L=65536 / L=16384"),
    ("blocksparse", "attnkit", 0.21, "block-sparse"),
    ("additive", "attnkit", (0.9, 801), "peak memory"),
    ("additive", "attnkit", (1.01, 10), "not slower"),
    ("graph", "gatconv", 0.0066, "GATConv"),
    ("graph", "sdpa", 0.09, "dense masked"),
    ("linear", "sdpa", 0.9, "causal SDPA"),
    ("linear_step", "attnkit", 1.3, "does not grow"),
    ("flex_window_fwd", "attnkit", 0.26, "mask_mod, L=16384 fwd:"),
    ("flex_window_fwdbwd", "attnkit", 0.63, "mask_mod, L=16384 fwd+bwd"),
    ("flex_docs_fwdbwd", "sdpa", 4.9, "packed causal documents"),
    ("flex_alibi_fwdbwd", "attnkit", 4.1, "ALiBi"),
    ("flex_cbm_Lmain", "attnkit", 1.01, "L=16384: under 1 s"),
    ("flex_cbm_Llong", "attnkit", (1.0, 410), "no L x S"),
    ("hf_prefill", "sdpa", 29.0, "prefill L=16384: >= 3 x"),
    ("hf_prefill", "attnkit", (10.0, 460), "half of sdpa's peak memory"),
    ("hf_train", "flex", 20.0, "where flex_attention refuses"),  # flex ran: nothing was refused
])
def test_each_threshold_flips_to_miss(role, impl, value, words):
    results = copy.deepcopy(_all_pass())
    case = next(c for c in results if c["role"] == role)
    t, mem = value if isinstance(value, tuple) else (value, None)
    case["impls"][impl]["median_s"] = t
    if mem is not None:
        case["impls"][impl]["peak_mb"] = mem
    missed = [k for k, v in _verdicts(results).items() if v == "MISS"]
    assert len(missed) == 1 and words in missed[0], missed


def test_recurrent_disagreement_is_a_miss():
    results = _all_pass()
    next(c for c in results if c["role"] == "linear_step")["check"]["recurrent_vs_parallel_max_abs"] = 2e-5
    assert _verdicts(results)["linear: recurrent form matches the parallel form to 1e-5"] == "MISS"


def test_missing_anchor_or_case_is_skip_with_the_reason():
    results = _all_pass()
    window = next(c for c in results if c["role"] == "window_fwd")
    window["impls"]["flex"] = {"median_s": None, "error": "skipped: FlexAttention does not compile here: X"}
    results = [c for c in results if c["role"] != "graph"]
    out = {v["target"]: v for v in targets.evaluate(results)}
    flex = out["window 128 fwd L=16384: >= 1.5 x faster than FlexAttention compiled"]
    assert flex["verdict"] == "SKIP" and "does not compile here" in flex["measured"]
    graph = [v for k, v in out.items() if k.startswith("graph")]
    assert [v["verdict"] for v in graph] == ["SKIP", "SKIP"] and "not run" in graph[0]["measured"]
    assert targets.format_summary(list(out.values())).endswith("30 PASS, 0 MISS, 3 SKIP")


def test_additive_memory_needs_a_measured_broadcast():
    results = _all_pass()
    add = next(c for c in results if c["role"] == "additive")
    for name in ("math", "broadcast"):
        del add["impls"][name]["peak_mb"]
    assert _verdicts(results)[targets.TARGETS[7][0]] == "SKIP"


def test_quick_summary_says_so():
    assert "NOT the issue's settings" in targets.format_summary(targets.evaluate([]), quick=True)


def test_window_scaling_uses_the_interleaved_case_and_falls_back_to_the_two_cases():
    res = _all_pass()
    out = {v["target"]: v["measured"] for v in targets.evaluate(res)}
    line = next(m for t, m in out.items() if "L=65536 / L=16384" in t)
    assert "= 4.47, interleaved" in line
    # the separately timed cases alone (e.g. `attnkit bench --only 'window128-L'`): their ratio, labelled so
    no_scaling = [c for c in res if c["role"] != "window_scaling"]
    slow = copy.deepcopy(no_scaling)
    next(c for c in slow if c["role"] == "window_fwdbwd_long")["impls"]["attnkit"]["median_s"] = 1.9
    v = next(v for v in targets.evaluate(slow) if "L=65536 / L=16384" in v["target"])
    assert v["verdict"] == "MISS" and "= 4.75, separate cases" in v["measured"]


def test_time_ratios_are_paired_by_round_when_both_ran_in_three_rounds():
    """Two implementations sampled in the same rounds are compared by the median of the per-round ratios. The
    dense case's samples below are from a real full run (ms; attnkit's dense path is SDPA itself): the medians of
    the two series, 330 and 302, make 1.09, a MISS, while the per-round ratios have median 1.01. Fewer than three
    common rounds (a slow anchor whose only sample is its first call) fall back to the ratio of medians; both
    figures are shown."""
    results = _all_pass()
    mine = [290, 309, 299, 330, 357, 332, 334, 272, 331]
    sdpa = [302, 302, 277, 301, 365, 329, 326, 272, 331]
    dense = results[0]
    dense["impls"]["attnkit"].update(median_s=330.0, times=[float(t) for t in mine], rounds=list(range(9)))
    dense["impls"]["sdpa"].update(median_s=302.0, times=[float(t) for t in sdpa])  # no rounds: old results
    name = "dense and causal: attnkit time <= 1.05 x SDPA's"
    line = {x["target"]: x for x in targets.evaluate(results)}[name]
    assert line["verdict"] == "MISS" and "dense 1.093 (ratio of medians;" in line["measured"]
    dense["impls"]["sdpa"]["rounds"] = list(range(9))
    line = {x["target"]: x for x in targets.evaluate(results)}[name]
    assert line["verdict"] == "PASS"
    assert "dense 1.009 (paired median of 9 rounds; ratio of medians 1.09" in line["measured"]

    bs = results[6]
    bs["impls"]["attnkit"].update(times=[0.19, 0.19], rounds=[0, 1])
    bs["impls"]["sdpa_nomask"].update(times=[1.0, 1.0], rounds=[-1, 0])
    line = {x["target"]: x for x in targets.evaluate(results)}[
        "block-sparse 10 % of 128x128 blocks, L=8192: time <= 0.2 x the dense time"]
    assert "0.190 (ratio of medians;" in line["measured"]
