"""`make bench`: run every benchmark side by side and write `bench/results.md` plus one PNG per benchmark.

Each benchmark module exposes `run(quick: bool) -> list[dict]`; every row it returns is shown. Columns whose name
contains `ratio` (a variant against its baseline, measured in the same run) are also plotted. Timings are not
asserted anywhere: this is a report, not a test.

    python -m bench.run_all            # quick sizes (minutes on a 2-core CPU)
    python -m bench.run_all --full     # the issue sizes (V = 49152, T = 2048, ...)
    python -m bench.run_all --only loss_kernels distill_step
    python -m bench.run_all --plot-only    # redraw the PNGs from the committed JSON, run nothing
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

BENCHMARKS = (
    "loss_kernels",
    "distill_step",
    "aligndistil_step",
    "generation",
    "generation_vllm",
    "fused_losses",
    "signals_throughput",
)
OUT = Path(__file__).parent
# Benchmarks whose JSON is `{config, versions, rows}` (what their own `--json` writes); the others' is the row list.
ENVELOPED = ("fused_losses", "signals_throughput")
# Benchmarks that draw their own PNG with `plot(name, rows)` (fused_losses keeps only its ratios vs TRL).
OWN_PLOT = ("fused_losses",)


# Keys that name what a row measured (not what it measured): tick labels use those whose values differ between the
# plotted rows; the ones every row shares go under the title.
IDENTITY_KEYS = (
    "group",
    "bench",
    "benchmark",
    "variant",
    "method",
    "name",
    "model",
    "student",
    "size",
    "batch",
    "seq",
    "responses_per_row",
)
CONTEXT_KEYS = ("vocab", "dtype", "threads")
# ratio column: (legend text, y-axis text, which way is better)
RATIOS = {
    "time_ratio_vs_naive": ("time vs naive", "time / extra-memory ratio vs the naive variant", "lower"),
    "mem_ratio_vs_naive": ("extra memory vs naive", "time / extra-memory ratio vs the naive variant", "lower"),
    "ratio_vs_sft": ("step time vs TRL SFT step", "step-time ratio vs TRL SFTTrainer step", "lower"),
    "ratio": ("tokens/s ours / raw (median)", "throughput ratio ours / raw", "higher"),
    "ratio_best": ("tokens/s ours / raw (best)", "throughput ratio ours / raw", "higher"),
    "ratio_paired": ("tokens/s ours / raw (paired)", "throughput ratio ours / raw", "higher"),
    "ratio_vs_forward": ("tokens/s vs raw forward", "throughput ratio ours / raw", "higher"),
    "ratio_vs_forward_topk": ("tokens/s vs raw forward + top-k", "throughput ratio ours / raw", "higher"),
    "ratio_vs_own_forward": ("tokens/s vs the job's own forwards", "throughput ratio ours / raw", "higher"),
}


def _ratio_text(column: str) -> tuple[str, str, str | None]:
    return RATIOS.get(column, (column.replace("_", " "), "ratio vs baseline (same run)", None))


def _key_text(key: str, value) -> str:
    return f"{key} {value}" if isinstance(value, (int, float)) else str(value)


def _label(row: dict, keys: list[str] | None = None) -> str:
    """Tick label of a row: its identity values (`keys`: only those), plus the baseline when it is another row."""
    keys = [k for k in (keys if keys is not None else IDENTITY_KEYS) if row.get(k) is not None]
    label = " · ".join(_key_text(k, row[k]) for k in keys) or "?"
    own = {str(row.get(k)) for k in ("variant", "method", "name")}
    if row.get("baseline") is not None and str(row["baseline"]) not in own:
        label += f"\n(vs {row['baseline']})"
    return label


def _varying(rows: list[dict], keys: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(keys whose values differ between rows, keys every row shares with one value)."""
    present = [k for k in keys if any(row.get(k) is not None for row in rows)]
    varying = [k for k in present if len({str(row.get(k)) for row in rows}) > 1]
    return varying, [k for k in present if k not in varying]


def figure(name: str, rows: list[dict]):
    """Bar chart of every `*ratio*` column, one group of bars per row; `None` when no row has a ratio."""
    ratio_columns = [c for c in RATIOS if any(isinstance(row.get(c), (int, float)) for row in rows)]
    ratio_columns += sorted(
        {k for row in rows for k, v in row.items() if "ratio" in k and isinstance(v, (int, float))} - set(RATIOS)
    )
    plotted = [row for row in rows if any(isinstance(row.get(c), (int, float)) for c in ratio_columns)]
    if not plotted:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying, shared = _varying(plotted, IDENTITY_KEYS)
    if not varying:
        varying, shared = shared, []
    labels = [_label(row, varying) for row in plotted]
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(plotted) * (len(ratio_columns) + 1) + 3), 4.8))
    # each row's bars sit side by side centred on its tick: a row without some ratio column leaves no gap
    present = [[c for c in ratio_columns if isinstance(row.get(c), (int, float))] for row in plotted]
    width = 0.8 / max(len(p) for p in present)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="1.0 = baseline", zorder=1)
    for column in ratio_columns:
        slots = [(x, p.index(column), len(p)) for x, p in enumerate(present) if column in p]
        xs = [x + (i - (n - 1) / 2) * width for x, i, n in slots]
        values = [plotted[x][column] for x, _, _ in slots]
        bars = ax.bar(xs, values, width, label=_ratio_text(column)[0], zorder=2)
        ax.bar_label(
            bars,
            labels=[f"{v:.2f}" for v in values],
            padding=2,
            fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
            zorder=3,
        )
    ax.set_xticks(range(len(plotted)), labels, rotation=30 if len(plotted) > 4 else 0, ha="right", fontsize=8)
    if len(plotted) <= 4:
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("center")
    ax.set_xlabel(" · ".join(varying))
    axis_texts = list(dict.fromkeys(_ratio_text(c)[1] for c in ratio_columns))
    better = {_ratio_text(c)[2] for c in ratio_columns}
    direction = f" ({better.pop()} is better)" if len(better) == 1 and None not in better else ""
    ax.set_ylabel("; ".join(axis_texts) + direction)
    ax.margins(y=0.12)
    context = [
        _key_text(k, plotted[0][k])
        for k in (*shared, *CONTEXT_KEYS)
        if plotted[0].get(k) is not None and str(plotted[0][k]) != name
    ]
    title = f"{name}: " + "; ".join(axis_texts) + direction
    ax.set_title(title + ("\n" + " · ".join(context) if context else ""), fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot(name: str, rows: list[dict]) -> Path | None:
    """Write `bench/<name>.png` (see `figure`); `None` when nothing is plotted."""
    fig = figure(name, rows)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_of(data: list[dict] | dict) -> list[dict]:
    """The rows of a benchmark JSON: the list itself, or the `rows` of a `{config, versions, rows}` document."""
    return data["rows"] if isinstance(data, dict) else data


def draw(name: str, rows: list[dict]) -> Path | None:
    """`bench/<name>.png` by the benchmark's own `plot` (`OWN_PLOT`) or by `plot`; `None` when nothing is drawn."""
    if name not in OWN_PLOT:
        return plot(name, rows)
    importlib.import_module(f"bench.{name}").plot(name, rows)
    path = OUT / f"{name}.png"
    return path if path.exists() else None


def document(name: str, rows: list[dict], full: bool) -> list[dict] | dict:
    """What `bench/<name>.json` holds after a run: the rows, or for `ENVELOPED` benchmarks the rows with the
    run's sizes and the library versions."""
    if name not in ENVELOPED:
        return rows
    from bench.fused_losses import _versions

    return {
        "config": {"sizes": "full" if full else "quick", "via": "bench.run_all"},
        "versions": _versions(),
        "rows": rows,
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the issue sizes instead of the quick ones")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the PNGs from the committed bench/<name>.json; run nothing"
    )
    args = parser.parse_args(argv)
    if args.plot_only:
        for name in args.only:
            if (OUT / f"{name}.json").exists():
                print(f"wrote {draw(name, rows_of(json.loads((OUT / f'{name}.json').read_text())))}")
        return 0
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
        figure = draw(name, rows)
        if figure is not None:
            sections += ["", f"![{name}]({figure.name})"]
        (OUT / f"{name}.json").write_text(json.dumps(document(name, rows, args.full), indent=2, default=str))
    (OUT / "results.md").write_text("\n".join(sections) + "\n")
    print(f"wrote {OUT / 'results.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
