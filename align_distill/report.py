"""Run reports: a markdown table of ground-truth scores and a bar chart, written next to the run's outputs."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("reward", "capability", "preference")


def results_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per model, the three ground-truth numbers."""
    lines = ["| model | reward | capability | preference rate |", "| --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['reward']:.3f} | {r['capability']:.3f} | {r['preference']:.3f} |")
    return "\n".join(lines)


def plot_results(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    for i, column in enumerate(COLUMNS):
        xs = [x + (i - 1) * width for x in range(len(names))]
        ax.bar(xs, [results[n][column] for n in names], width, label=column)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ground truth (greedy)")
    ax.legend(loc="upper left", ncols=3, fontsize=8)
    ax.set_title("align-distill quickstart: synthetic task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, results: dict[str, dict], models: dict[str, str]) -> None:
    n = next(iter(results.values()))["n"] if results else 0
    text = [
        "# align-distill run report",
        "",
        f"Ground-truth reward on {n} held-out prompts, greedy decoding. reward = 0.5 capability + 0.5 preference.",
        "",
        results_table(results),
        "",
        "![reward](reward.png)",
        "",
        "## Models",
        "",
        *[f"- {name}: `{path}`" for name, path in models.items()],
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(text))
    plot_results(results, out_dir / "reward.png")
