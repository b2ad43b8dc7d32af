"""Turn bench results into a table, a JSON file and a log-log plot (time vs L). Files are written atomically."""

from __future__ import annotations

from pathlib import Path

from attnkit._io import save_figure_atomic, write_json_atomic, write_text_atomic


def rows(results: list[dict]) -> list[list[str]]:
    """One row per (case, implementation): the table printed by ``attnkit bench``."""
    out = []
    for case in results:
        base = case["impls"].get("attnkit", {}).get("median_s")
        for name, r in case["impls"].items():
            t = r.get("median_s")
            if t is None:
                out.append([case["id"], name, "", "", "-", "-", "-", "-", "-", r.get("error", "")[:110]])
                continue
            ratio = f"{t / base:.2f}" if base else "-"
            gf = f"{r['gflops']:.1f}" if r.get("gflops") is not None else "-"
            pk = f"{r['pct_peak']:.0f}%" if r.get("pct_peak") is not None else "-"
            mem = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
            note = r.get("note", "") or (case.get("note", "") if name == "attnkit" else "")
            out.append([case["id"], name, case.get("backend", "") if name == "attnkit" else "", str(r["n"]),
                        f"{t * 1e3:.2f}", ratio, gf, pk, mem, note])
    return out


HEADER = ["case", "impl", "auto->", "n", "median ms", "t/t_attnkit", "GFLOP/s", "%peak", "peak MB", "note"]


def format_table(results: list[dict]) -> str:
    table = [HEADER, *rows(results)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    write_json_atomic(path, payload)


def write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def write_plot(path: Path, results: list[dict]) -> bool:
    """Log-log time vs L, one panel per case group (lines where a group has several L); False if empty."""
    groups: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for case in results:
        if case.get("role") == "window_scaling":  # the same lengths are points of the window cases' lines
            continue
        for name, r in case["impls"].items():
            if r.get("median_s") is not None:
                groups.setdefault(case["group"], {}).setdefault(name, []).append((case["L"], r["median_s"]))
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (group, lines) in zip(axes[0], sorted(groups.items()), strict=True):
        for name, pts in sorted(lines.items()):
            pts.sort()
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_title(group)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("median time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
    return True
