"""``attnkit bench``: time attnkit's kernels against SDPA, the plain math path and other anchors.

    attnkit bench --out runs/bench            # full run (minutes; run it alone on the machine)
    attnkit bench --quick --out /tmp/b        # small sizes, seconds (what the tests run)
    attnkit bench --out runs/bench --resume   # after an interruption: time only the cases not done yet

Each finished case is saved at once to ``bench.partial.json`` in ``--out``, so an interrupted run (Ctrl-C) loses
at most the case it was timing; ``--resume`` keeps the saved cases (every ratio is measured within one case, with
its implementations interleaved, so cases timed in two sittings still compare like with like) when the options,
the torch version and attnkit's source are the same, and the file is removed when the run completes.

Writes ``bench.json`` (every sample, machine facts, notes), ``bench.txt`` (the table) and ``bench.png``
(log-log time vs L) to ``--out``, and prints the table, ending with one PASS / MISS / SKIP line per "Done when"
target of issue 5 (:mod:`attnkit.bench.targets`, computed from this run's numbers). See
:mod:`attnkit.bench.timing` for how time and memory are measured and :mod:`attnkit.bench.cases` for the cases
and how the needed work (GFLOP/s) is counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

from attnkit import _argtypes as A


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time attnkit's kernels against SDPA and other anchors",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=A.path, default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every case")
    p.add_argument("--threads", type=A.int_at_least(1, 1024), default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=A.int_at_least(1, 1000), default=None,
                   help="timed repeats per implementation (default 5, quick 3)")
    p.add_argument("--only", default=None, type=A.regex_type,
                   help="run only cases whose id matches this regular expression (re.search), e.g. 'window.*fwd$'")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention anchor")
    p.add_argument("--resume", action="store_true",
                   help=f"keep the cases an interrupted run saved in --out/{PARTIAL} and time only the others")
    p.set_defaults(func=run)


PARTIAL = "bench.partial.json"


def _settings(args, repeats: int) -> dict:
    """What must match for saved cases to be reused by --resume: the options that change what is timed, the torch
    version, and a hash of attnkit's source (cases timed on other code are not mixed in)."""
    import hashlib

    import torch

    import attnkit

    digest = hashlib.sha256()
    root = Path(attnkit.__file__).resolve().parent
    for f in sorted(root.rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return {"quick": bool(args.quick), "threads": args.threads, "repeats": repeats, "no_memory": bool(args.no_memory),
            "no_flex": bool(args.no_flex), "torch": torch.__version__, "attnkit_source": digest.hexdigest()[:16]}


def _load_partial(path: Path, settings: dict) -> tuple[list, float | None, list]:
    """Saved (cases, matmul peak, notes) of an interrupted run with the same settings; raises ValueError with the
    reason when the file cannot be used."""
    import json

    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return [], None, []
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); delete it or run without --resume") from exc
    if not isinstance(saved, dict) or saved.get("settings") != settings or not isinstance(saved.get("cases"), list):
        was = saved.get("settings") if isinstance(saved, dict) else "unknown"
        raise ValueError(f"{path} was written with other settings ({was}; now {settings}); rerun with those "
                         "settings, or delete it to start over")
    peak, notes = saved.get("matmul_peak_gflops"), saved.get("notes", [])
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or not peak > 0):
        raise ValueError(f"{path}: field 'matmul_peak_gflops' must be a number > 0; got {peak!r}; delete the file "
                         "or run without --resume")
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ValueError(f"{path}: field 'notes' must be a list of strings; delete the file or run without --resume")
    for i, entry in enumerate(saved["cases"]):
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"{path}: cases[{i}] {problem}; delete the file or run without --resume")
    return saved["cases"], peak, list(notes)


def _entry_problem(entry) -> str:
    """What is wrong with one saved case (as ``_time_cases`` writes it), or ``""``."""
    if not isinstance(entry, dict):
        return f"must be a JSON object; got {type(entry).__name__}"
    for key, types in (("id", str), ("group", str), ("mode", str), ("backend", str), ("note", str),
                       ("L", int), ("impls", dict)):
        if not isinstance(entry.get(key), types) or isinstance(entry.get(key), bool):
            return f"field {key!r} must be a {types.__name__}; got {entry.get(key)!r}"
    for name, r in entry["impls"].items():
        if not isinstance(r, dict):
            return f"impls[{name!r}] must be a JSON object; got {type(r).__name__}"
        t = r.get("median_s")
        if t is None:
            if not isinstance(r.get("error", ""), str):
                return f"impls[{name!r}].error must be a string"
            continue
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            return f"impls[{name!r}].median_s must be a number > 0 or null; got {t!r}"
        if isinstance(r.get("n"), bool) or not isinstance(r.get("n"), int) or r["n"] < 1:
            return f"impls[{name!r}].n must be an int >= 1; got {r.get('n')!r}"
        for key in ("gflops", "pct_peak", "peak_mb", "compile_s"):
            v = r.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                return f"impls[{name!r}].{key} must be a number or null; got {v!r}"
        if not isinstance(r.get("note", ""), str):
            return f"impls[{name!r}].note must be a string"
        for key in ("times", "rounds"):
            v = r.get(key)
            if v is not None and not (isinstance(v, list) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                return f"impls[{name!r}].{key} must be a list of numbers; got {v!r}"
    if entry.get("role") is not None and not isinstance(entry["role"], str):
        return f"field 'role' must be a string or null; got {entry['role']!r}"
    return ""


def run(args: argparse.Namespace) -> int:
    import torch

    from attnkit.bench import cases as _cases
    from attnkit.bench import report, targets, timing

    args.out = Path(args.out)
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, repeats)
    partial = args.out / PARTIAL
    done, peak, notes = [], None, []
    if args.resume:
        try:
            done, peak, notes = _load_partial(partial, settings)
        except ValueError as exc:
            print(f"--resume: {exc}", file=sys.stderr)
            return 2
    if peak is None:  # the saved cases' GFLOP/s are against the peak measured when they were timed
        peak = timing.matmul_peak_gflops(args.threads, n=512 if args.quick else 2048)
    print(f"torch {torch.__version__}, {args.threads} threads, matmul peak {peak:.1f} GFLOP/s"
          + (f"; resuming with {len(done)} saved case(s) from {partial}" if done else ""), flush=True)
    all_cases = _cases.build_cases(args.quick, flex=not args.no_flex)
    import re

    pattern = re.compile(args.only or "")
    chosen = [c for c in all_cases if pattern.search(c.id)]
    saved = {e["id"]: e for e in done}
    results = [saved[c.id] for c in chosen if c.id in saved]
    chosen = [c for c in chosen if c.id not in saved]
    if results:
        print(report.format_table(results).split("\n", 2)[-1], flush=True)
    from attnkit._progress import progress as tqdm

    if importlib.util.find_spec("tqdm") is None:  # tqdm is in the [tasks] extra; the bench runs without it
        def tqdm(x, **_):
            return x
    t_start = time.perf_counter()
    try:
        _time_cases(chosen, results, notes, args, repeats, peak, tqdm, partial, settings)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(results)} case(s) saved in {partial}; run the same command with --resume to "
              "time the others", file=sys.stderr)
        return 130
    order = {c.id: i for i, c in enumerate(all_cases)}
    results.sort(key=lambda e: order.get(e["id"], len(order)))
    verdicts = targets.evaluate(results)
    payload = {
        "machine": {"torch": torch.__version__, "threads": args.threads, "matmul_peak_gflops": peak,
                    "cpu_count": os.cpu_count(), "platform": platform.platform(), "quick": args.quick},
        "timing": "interleaved round-robin, median of repeats; warm-up call not counted unless it took > 5 s",
        "memory": "peak RSS of a fresh child process over the call (VmHWM after reset) minus RSS before it",
        "flops": "work needed: 4*B*H*pairs*D forward (allowed pairs only), x3 for forward+backward; "
                 "additive B*L*S*(4*hidden + 2*Dv)",
        "wall_s": time.perf_counter() - t_start,
        "notes": notes,
        "targets": verdicts,
        "cases": results,
    }
    report.write_json(args.out / "bench.json", payload)
    partial.unlink(missing_ok=True)  # complete: nothing left to resume
    head = (f"attnkit bench: torch {torch.__version__}, float32, {args.threads} threads, measured matmul peak "
            f"{peak:.1f} GFLOP/s; median of interleaved repeats; t/t_attnkit > 1 = attnkit faster")
    blocks = [head, report.format_table(results), "\n".join(f"note: {n}" for n in notes),
              targets.format_summary(verdicts, quick=args.quick)]
    text = "\n\n".join(b for b in blocks if b)
    report.write_text(args.out / "bench.txt", text + "\n")
    plotted = report.write_plot(args.out / "bench.png", results)
    print("\n" + text)
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.txt'}" + (", bench.png" if plotted else ""))
    return 0


def _time_cases(chosen, results, notes, args, repeats, peak, tqdm, partial: Path, settings: dict) -> None:
    """Time ``chosen`` cases, appending each finished entry to ``results`` and saving all of them to ``partial``."""
    from attnkit.bench import anchors, report, timing

    for case in tqdm(chosen, desc="bench", unit="case", file=sys.stderr):
        fns, errors = {}, {}
        for name, make in case.impls.items():
            try:
                fns[name] = make()
            except anchors.AnchorUnavailable as exc:  # optional anchor missing here: say why in the table
                errors[name] = f"skipped: {exc}"
            except Exception as exc:  # an anchor that cannot run here is reported, not fatal
                errors[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        timed = timing.interleaved_medians(fns, repeats=repeats) if fns else {}
        entry = {"id": case.id, "group": case.group, "L": case.L, "mode": case.mode, "backend": case.backend,
                 "flops": case.flops, "note": case.note, "role": case.role, "impls": {}}
        if case.extra:
            entry["extra"] = case.extra
        if case.check is not None:
            entry["check"] = case.check()
            entry["note"] = "; ".join([case.note] + [f"{k} {v:.2g}" for k, v in entry["check"].items()
                                                     if isinstance(v, float)])
        for name in case.impls:
            if name in errors:
                entry["impls"][name] = {"median_s": None, "error": errors[name]}
                notes.append(f"{case.id}/{name}: {errors[name]}")
                continue
            r = dict(timed[name])
            if case.flops:
                r["gflops"] = case.flops / r["median_s"] / 1e9
                r["pct_peak"] = 100.0 * r["gflops"] / peak
            if name == "flex" and case.id in anchors.COMPILE_TIMES:
                r["compile_s"] = anchors.COMPILE_TIMES[case.id]
                r["note"] = f"compile {r['compile_s']:.1f} s (not in the time)"
            if name in case.memory and not args.no_memory:
                del fns[name]  # free this process's copy before the child runs
                mem, why = timing.peak_memory_bytes(case.id, name, quick=args.quick, threads=args.threads)
                r["peak_mb"] = None if mem is None else mem / 2**20
                if why:
                    notes.append(f"{case.id}/{name} memory not measured: {why}")
            entry["impls"][name] = r
        results.append(entry)
        fns.clear()
        print(report.format_table([entry]).split("\n", 2)[-1], flush=True)
        report.write_json(partial, {"settings": settings, "matmul_peak_gflops": peak, "notes": notes,
                                    "cases": results})
