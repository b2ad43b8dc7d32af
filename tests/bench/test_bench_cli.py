"""`attnkit bench --quick` end to end (a few cases), the timing helpers and the report writers."""

import json

import torch

from attnkit.bench import report, timing
from attnkit.cli import main


def test_quick_bench_writes_json_table_and_plot(tmp_path, capsys):
    rc = main(["bench", "--quick", "--only", r"^window32-L1024-fwd\+bwd$", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    ids = [c["id"] for c in data["cases"]]
    assert ids == ["window32-L1024-fwd+bwd"]
    assert data["machine"]["matmul_peak_gflops"] > 0
    for case in data["cases"]:
        assert case["impls"]["attnkit"]["median_s"] > 0
        assert "sdpa" in case["impls"]
    mem = data["cases"][-1]["impls"]["attnkit"]
    assert mem.get("peak_mb") is not None or any("memory" in n for n in data["notes"])
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "window32-L1024-fwd+bwd" in (tmp_path / "bench.txt").read_text()
    assert "median ms" in capsys.readouterr().out


def test_interleaved_runs_round_robin_and_takes_median():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    res = timing.interleaved_medians(fns, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then alternating
    assert res["a"]["n"] == 3 and res["a"]["median_s"] == sorted(res["a"]["times"])[1]


def test_rss_sees_a_torch_allocation():
    before = timing.rss_bytes()
    x = torch.ones(50 * 2**20 // 4)  # 50 MiB, touched
    assert timing.rss_bytes() - before > 40 * 2**20
    del x


def test_table_ratios():
    results = [{"id": "c", "group": "g", "L": 1, "backend": "window", "note": "", "impls": {
        "attnkit": {"median_s": 0.5, "n": 3}, "sdpa": {"median_s": 2.0, "n": 3}}}]
    table = report.format_table(results)
    assert "4.00" in table and "500.00" in table


def test_missing_optional_anchor_is_a_note_and_a_skip(tmp_path, capsys, monkeypatch):
    from attnkit.bench import anchors

    def not_installed(module, pip_name):
        raise anchors.AnchorUnavailable(f"{pip_name} not installed (pip install 'attnkit[bench]')")

    monkeypatch.setattr(anchors, "_require", not_installed)
    rc = main(["bench", "--quick", "--only", "^graph", "--repeats", "1", "--no-memory", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    gat = data["cases"][0]["impls"]["gatconv"]
    assert gat["median_s"] is None and gat["error"].startswith("skipped: torch_geometric not installed")
    verdicts = {v["target"]: v["verdict"] for v in data["targets"]}
    assert verdicts["graph (Cora-sized) fwd+bwd: <= 1.5 x PyTorch Geometric's GATConv time"] == "SKIP"
    out = capsys.readouterr().out
    assert "skipped: torch_geometric not installed" in out
    assert out.rstrip().splitlines()[-2].startswith("targets: ")  # the summary ends the table, then "wrote ..."


def test_interrupted_bench_resumes_only_the_missing_cases(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second case leaves the first saved; --resume times only the second, writes the complete
    report with both in case order, and removes the partial file. A resume with other settings, or from a damaged
    file, is refused with the reason."""
    args = ["bench", "--quick", "--only", "^(dense|causal)-L256$", "--repeats", "1", "--no-memory", "--no-flex",
            "--out", str(tmp_path)]
    real = timing.interleaved_medians
    calls = []

    def interrupting(fns, **kw):
        calls.append(sorted(fns))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(fns, **kw)

    monkeypatch.setattr(timing, "interleaved_medians", interrupting)
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    saved = json.loads((tmp_path / "bench.partial.json").read_text())
    assert [c["id"] for c in saved["cases"]] == ["dense-L256"]
    assert not (tmp_path / "bench.json").exists()

    assert main([*args[:-2], "--repeats", "2", "--out", str(tmp_path), "--resume"]) == 2  # other settings
    assert "other settings" in capsys.readouterr().err

    calls.clear()

    def counting(fns, **kw):
        calls.append(sorted(fns))
        return real(fns, **kw)

    monkeypatch.setattr(timing, "interleaved_medians", counting)
    assert main([*args, "--resume"]) == 0
    assert len(calls) == 1  # only causal was timed again
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [c["id"] for c in data["cases"]] == ["dense-L256", "causal-L256"]
    assert data["cases"][0] == saved["cases"][0]
    assert data["machine"]["matmul_peak_gflops"] == saved["matmul_peak_gflops"]
    assert not (tmp_path / "bench.partial.json").exists()

    saved["settings"]["attnkit_source"] = "0" * 16  # cases timed on other code are not reused
    (tmp_path / "bench.partial.json").write_text(json.dumps(saved))
    assert main([*args, "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err

    (tmp_path / "bench.partial.json").write_text("{not json")
    assert main([*args, "--resume"]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_resume_from_well_formed_json_with_bad_entries_is_refused_by_field(tmp_path, capsys):
    """A partial file with the right settings but damaged cases (hand-edited, another tool) names the entry and
    field instead of failing later with a raw KeyError/TypeError."""
    import pytest

    from attnkit.bench import cli
    from attnkit.cli import build_parser

    argv = ["bench", "--quick", "--only", "^dense-", "--repeats", "1", "--no-memory", "--no-flex",
            "--out", str(tmp_path), "--resume"]
    settings = cli._settings(build_parser(argv).parse_args(argv), 1)
    good = {"id": "dense-L256", "group": "dense", "L": 256, "mode": "fwd", "backend": "sdpa", "flops": 1.0,
            "note": "", "role": None, "impls": {"attnkit": {"median_s": 0.001, "n": 1, "times": [0.001]}}}
    bad_cases = [
        ([1], r"cases\[0\] must be a JSON object"),
        ([{**good, "L": "256"}], r"cases\[0\] field 'L' must be a int"),
        ([{**good, "impls": {"attnkit": {"median_s": "fast", "n": 1}}}], r"impls\['attnkit'\].median_s must be"),
        ([good, {**good, "impls": {"attnkit": {"median_s": 0.1, "n": 0}}}], r"cases\[1\] impls\['attnkit'\].n must"),
        ([{**good, "impls": {"attnkit": {"median_s": 0.1, "n": 1, "times": ["x"]}}}], r"times must be a list"),
    ]
    import re

    for cases, message in bad_cases:
        (tmp_path / "bench.partial.json").write_text(json.dumps({"settings": settings, "matmul_peak_gflops": 10.0,
                                                                 "notes": [], "cases": cases}))
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="matmul_peak_gflops"):
        (tmp_path / "p.json").write_text(json.dumps({"settings": settings, "matmul_peak_gflops": "x", "cases": []}))
        cli._load_partial(tmp_path / "p.json", settings)
