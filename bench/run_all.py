"""`make bench`: run every benchmark side by side and write `bench/results.md` plus one PNG per benchmark.

Each benchmark module exposes `run(quick: bool) -> list[dict]`; every row it returns is shown. Columns whose name
contains `ratio` (a variant against its baseline, measured in the same run) are also plotted. Timings are not
asserted anywhere: this is a report, not a test.

    python -m bench.run_all            # quick sizes (minutes on a 2-core CPU)
    python -m bench.run_all --full     # the issue sizes (V = 49152, T = 2048, ...)
    python -m bench.run_all --only loss_kernels distill_step
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
import traceback
from datetime import date
from pathlib import Path

import torch

BENCHMARKS = ("loss_kernels", "distill_step", "aligndistil_step", "generation", "generation_vllm")
OUT = Path(__file__).parent


def _label(row: dict) -> str:
    parts = [str(row[k]) for k in ("group", "benchmark", "variant", "name", "size") if k in row and row[k] is not None]
    return " / ".join(parts) or "row"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and not isinstance(row[k], (list, dict)))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot(name: str, rows: list[dict]) -> Path | None:
    ratio_columns = sorted({k for row in rows for k, v in row.items() if "ratio" in k and isinstance(v, (int, float))})
    plotted = [row for row in rows if any(isinstance(row.get(c), (int, float)) for c in ratio_columns)]
    if not plotted:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(plotted) * len(ratio_columns)), 4))
    width = 0.8 / len(ratio_columns)
    for i, column in enumerate(ratio_columns):
        xs = [x + (i - (len(ratio_columns) - 1) / 2) * width for x in range(len(plotted))]
        ax.bar(xs, [row.get(column) or 0 for row in plotted], width, label=column)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(plotted)), [_label(r) for r in plotted], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ratio vs baseline (same run)")
    ax.set_title(name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the issue sizes instead of the quick ones")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args(argv)
    sections = [
        "# Benchmark results",
        "",
        f"{date.today()} · {platform.processor() or platform.machine()} · {torch.get_num_threads()} threads · "
        f"torch {torch.__version__} · {'full' if args.full else 'quick'} sizes. Ratios are against a baseline "
        "measured side by side in the same run.",
    ]
    failures = 0
    for name in args.only:
        print(f"== {name}", flush=True)
        started = time.time()
        try:
            rows = importlib.import_module(f"bench.{name}").run(quick=not args.full)
        except Exception:  # one broken benchmark must not hide the others' numbers
            failures += 1
            sections += ["", f"## {name}", "", "```", traceback.format_exc(limit=3), "```"]
            continue
        sections += ["", f"## {name}", "", f"({time.time() - started:.0f} s)", "", table(rows)]
        figure = plot(name, rows)
        if figure is not None:
            sections += ["", f"![{name}]({figure.name})"]
        (OUT / f"{name}.json").write_text(json.dumps(rows, indent=2, default=str))
    (OUT / "results.md").write_text("\n".join(sections) + "\n")
    print(f"wrote {OUT / 'results.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
