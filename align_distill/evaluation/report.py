"""What an evaluation writes: `results.json` (everything), `eval.json` (each model's headline numbers, which the model
card's `model-index` reads), `report.md`, and two charts: win-rates with their intervals, score distributions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from align_distill.run_files import EVAL_FILE

WIN_RATE_PNG = "win_rate.png"
SCORES_PNG = "scores.png"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def headline(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """label → {metric: mean, ..., win_rate, lc_win_rate, n}: flat numbers per model (eval.json)."""
    table: dict[str, dict[str, float]] = {}
    for label, summary in results["models"].items():
        row = {metric: value["mean"] for metric, value in summary["metrics"].items()}
        judge = summary.get("judge") or {}
        for key in ("win_rate", "lc_win_rate"):
            if key in judge:
                row[key] = judge[key]["mean" if key == "win_rate" else "win_rate"]
        row["n"] = summary["answered"]
        table[label] = row
    return table


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    """results.json, eval.json, report.md and the charts, each written whole or not at all."""
    _write(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    _write(out / EVAL_FILE, json.dumps(headline(results), indent=2, ensure_ascii=False) + "\n")
    charts = []
    if any("win_rate" in (s.get("judge") or {}) for s in results["models"].values()):
        plot_win_rates(results, out / WIN_RATE_PNG)
        charts.append(WIN_RATE_PNG)
    if any(s["metrics"] for s in results["models"].values()):
        plot_scores(results, out / SCORES_PNG)
        charts.append(SCORES_PNG)
    _write(out / "report.md", render_report(results, charts))


def _interval(value: dict[str, Any]) -> str:
    return f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


def render_report(results: dict[str, Any], charts: list[str]) -> str:
    models = results["models"]
    baseline = results.get("baseline")
    lines = [
        "# Evaluation",
        "",
        f"Prompts: `{results['prompts']}`. Every number is a mean over prompts with its bootstrap 95 % interval "
        f"({results['bootstrap']['resamples']} resamples of the prompts)"
        + (f"; differences are paired by prompt against **{baseline}**." if baseline else "."),
        "",
    ]
    judged = {label: s["judge"] for label, s in models.items() if s.get("judge")}
    if judged:
        judge = results["scorers"]["pairwise_judge"]
        lines += [
            f"## Win-rate against {baseline}",
            "",
            f"Judge: {judge['kind']} `{judge['model']}`. Each prompt is judged in both orders; a disagreement is a "
            "tie, ties count half. LC = length-controlled (the win-rate at equal answer length, see "
            "docs/evaluation.md). Unparsable: prompts whose verdict could not be read in either order, left out.",
            "",
            "| model | win-rate | LC win-rate | wins / ties / losses | unparsable |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for label, j in judged.items():
            lc = j.get("lc_win_rate")
            lc_text = f"{lc['win_rate']:.3f} [{lc['low']:.3f}, {lc['high']:.3f}]" if lc else "—"
            rate = _interval(j["win_rate"]) if "win_rate" in j else "—"
            lines.append(
                f"| {label} | {rate} | {lc_text} | {j['wins']} / {j['ties']} / {j['losses']} | {j['unparsable']} |"
            )
        lines.append("")
    metrics = list(dict.fromkeys(m for s in models.values() for m in s["metrics"]))
    if metrics:
        lines += [
            "## Scores",
            "",
            "| model | answered | " + " | ".join(metrics) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " |",
        ]
        for label, s in models.items():
            cells = [_interval(s["metrics"][m]) if m in s["metrics"] else "—" for m in metrics]
            lines.append(f"| {label} | {s['answered']} / {s['prompts']} | " + " | ".join(cells) + " |")
        lines.append("")
    paired = {label: s["versus_baseline"] for label, s in models.items() if s.get("versus_baseline")}
    if paired:
        lines += [
            f"## Differences from {baseline} (paired by prompt)",
            "",
            "| model | metric | Δ [95 % CI] | prompts +/− | what the interval supports |",
            "| --- | --- | ---: | ---: | --- |",
        ]
        for label, by_metric in paired.items():
            for metric, d in by_metric.items():
                lines.append(
                    f"| {label} | {metric} | {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | "
                    f"{d['positive']}/{d['negative']} of {d['seeds']} | {d['verdict']} |"
                )
        lines.append("")
    lines += [f"![{Path(chart).stem}]({chart})" for chart in charts] + [""] if charts else []
    lines += ["Per-prompt answers, scores and verdicts: `results.json`.", ""]
    return "\n".join(lines)


def plot_win_rates(results: dict[str, Any], path: Path) -> None:
    """Win-rate and LC win-rate per model against the baseline, 95 % intervals as error bars, values on the bars."""
    matplotlib.use("Agg")
    judged = {label: s["judge"] for label, s in results["models"].items() if "win_rate" in (s.get("judge") or {})}
    names = list(judged)
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4.4))
    for offset, key, value_key, label in (
        (-width / 2, "win_rate", "mean", "win-rate"),
        (width / 2, "lc_win_rate", "win_rate", "length-controlled"),
    ):
        values = [judged[n][key][value_key] for n in names]
        errors = [
            [v - judged[n][key]["low"] for n, v in zip(names, values)],
            [judged[n][key]["high"] - v for n, v in zip(names, values)],
        ]
        bars = ax.bar([x + offset for x in range(len(names))], values, width, yerr=errors, capsize=4, label=label)
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8, label_type="center")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_xlabel("model")
    ax.set_ylabel(f"win-rate against {results['baseline']} (95 % CI)")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.set_title(f"Judge win-rate against {results['baseline']} (both orders, ties count half)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scores(results: dict[str, Any], path: Path) -> None:
    """One panel per metric: each model's score distribution (box and points) with its mean written above."""
    matplotlib.use("Agg")
    models = results["models"]
    metrics = list(dict.fromkeys(m for s in models.values() for m in s["metrics"]))
    names = list(models)
    per_metric = {m: [[row["scores"].get(n, {}).get(m) for row in results["rows"]] for n in names] for m in metrics}
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 0.75 * len(names) + 2), 3.4 * len(metrics)))
    axes = [axes] if len(metrics) == 1 else list(axes)
    for ax, metric in zip(axes, metrics):
        data = [[v for v in values if v is not None] for values in per_metric[metric]]
        ax.boxplot([d or [float("nan")] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
        for x, name in enumerate(names, start=1):
            summary = models[name]["metrics"].get(metric)
            if summary:
                ax.annotate(f"{summary['mean']:.2f}", (x, summary["mean"]), textcoords="offset points",
                            xytext=(12, 0), fontsize=8, va="center")  # fmt: skip
        ax.set_xlabel("model")
        ax.set_ylabel(f"{metric} per prompt")
        ax.set_title(f"{metric}: distribution over prompts (triangle = mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
