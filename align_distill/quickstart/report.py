"""Run reports: a markdown table of ground-truth scores and a bar chart, written next to the run's outputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from align_distill.quickstart.curves import steps_to_90

COLUMNS = ("reward", "capability", "preference")


def results_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per model, the three ground-truth numbers."""
    lines = ["| model | reward | capability | preference rate |", "| --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['reward']:.3f} | {r['capability']:.3f} | {r['preference']:.3f} |")
    return "\n".join(lines)


SMOKE_NOTE = "smoke run: toy sizes (2 training steps per stage), checks the wiring only; the scores mean nothing"


def plot_results(results: dict[str, dict], path: Path | None = None, smoke: bool = False):
    """Grouped bars of the three ground-truth scores per model, values on the bars; saved to `path` when given.
    Returns the (closed) Figure. A smoke run says so in the title."""

    matplotlib.use("Agg")

    names = list(results)
    n = results[names[0]].get("n") if names else None
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(names) + 2), 4.6))
    for i, column in enumerate(COLUMNS):
        xs = [x + (i - 1) * width for x in range(len(names))]
        bars = ax.bar(xs, [results[m][column] for m in names], width, label=column)
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_xlabel("model")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("ground-truth score (greedy decoding)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    title = "Quickstart ground-truth scores on the synthetic task, one seed" + (f" ({n} test prompts)" if n else "")
    if smoke:
        title = f"SMOKE RUN — {title}\n({SMOKE_NOTE.removeprefix('smoke run: ')})"
    ax.set_title(title, fontsize=10, color="firebrick" if smoke else "black")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def curves_section(curves: dict[str, list[dict]], png: str) -> list[str]:
    """Report lines for reward-vs-steps curves: the chart and, per method, reward at each measured step."""

    steps = sorted({int(p["step"]) for points in curves.values() for p in points})
    lines = [
        "## Convergence: reward vs optimizer steps",
        "",
        "Each method retrained from the same SFT student with its quickstart settings, measuring the ground-truth",
        "reward every few optimizer steps (the first 200 of the test-split prompts above).",
        "",
        f"![reward vs steps]({png})",
        "",
        "| method | " + " | ".join(f"step {s}" for s in steps) + " | steps to 90% of gain |",
        "| --- | " + " | ".join("---:" for _ in steps) + " | ---: |",
    ]
    for method, points in curves.items():
        by_step = {int(p["step"]): p["reward"] for p in points}
        cells = [f"{by_step[s]:.3f}" if s in by_step else "" for s in steps]
        lines.append(f"| {method} | {' | '.join(cells)} | {steps_to_90(points) or '—'} |")
    return lines + [""]


def write_report(
    out_dir: Path,
    results: dict[str, dict],
    models: dict[str, str],
    curves: dict[str, list[dict]] | None = None,
    curves_png: str | None = None,
    smoke: bool = False,
) -> None:
    n = next(iter(results.values()))["n"] if results else 0
    text = [
        "# align-distill run report" + (" (smoke run)" if smoke else ""),
        "",
        *([f"> **{SMOKE_NOTE[0].upper()}{SMOKE_NOTE[1:]}.**", ""] if smoke else []),
        f"One seed: ground-truth reward on the seed's {n} test-split prompts (no training file contains them),",
        "greedy decoding; reward = 0.5 capability + 0.5 preference. One seed shows whether the wiring works, not",
        "which method is better: the comparison over seeds, with matched baselines and intervals, is",
        "align-distill's docs/results.md.",
        "",
        results_table(results),
        "",
        "![reward](reward.png)",
        "",
        *(curves_section(curves, curves_png or "reward_vs_steps.png") if curves else []),
        "## Models",
        "",
        *[f"- {name}: `{path}`" for name, path in models.items()],
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(text))
    plot_results(results, out_dir / "reward.png", smoke=smoke)
