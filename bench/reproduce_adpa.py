"""Reproduce the ADPA paper's comparison on the quickstart task: SFT / DPO / DCKD / ADPA / ADPA+ students, over seeds.

The paper's claim (docs/methods/dckd_adpa.md §6):
DCKD and ADPA both improve a small student's alignment, ADPA beats DCKD,
and ADPA+ (DCKD then ADPA) is best. Here every method runs inside the quickstart pipeline (same tiny teacher pair,
same SFT student, same synthetic data per seed) and is scored with the task's ground-truth reward; the table gives
mean ± sd over the seeds of reward, capability and preference rate.

Each seed is one pipeline run under `<run-dir>/seed<k>`, so an interrupted or repeated invocation reuses finished
stages. `--quick` runs the pipeline at toy size (`quickstart --smoke`: 2 steps per stage), which checks the wiring
in minutes but gives meaningless numbers.

Run: `python -m bench.reproduce_adpa [--quick] [--seeds 0 1 2] [--run-dir runs/reproduce_adpa]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METHODS = ["dpo", "dckd", "adpa", "adpa_plus"]
COLUMNS = ("reward", "capability", "preference")


def run_seeds(run_dir: Path, seeds: list[int], methods: list[str], quick: bool) -> dict[int, dict[str, dict]]:
    from align_distill.quickstart import run_quickstart

    return {seed: run_quickstart(run_dir / f"seed{seed}", methods=methods, seed=seed, smoke=quick) for seed in seeds}


def summarize(results: dict[int, dict[str, dict]]) -> list[dict]:
    """One row per model: mean and sd (0 for one seed) of each column over the seeds that evaluated it."""
    models = list(dict.fromkeys(name for per_seed in results.values() for name in per_seed))
    rows = []
    for model in models:
        row: dict = {"bench": "reproduce_adpa", "model": model, "seeds": 0}
        for column in COLUMNS:
            values = [per_seed[model][column] for per_seed in results.values() if model in per_seed]
            row["seeds"] = len(values)
            row[f"{column}_mean"] = round(statistics.fmean(values), 4)
            row[f"{column}_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | reward | capability | preference rate | seeds |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        cells = [f"{row[f'{c}_mean']:.3f} ± {row[f'{c}_sd']:.3f}" for c in COLUMNS]
        lines.append(f"| {row['model']} | {' | '.join(cells)} | {row['seeds']} |")
    return "\n".join(lines)


def run(quick: bool = True, seeds: list[int] | None = None, run_dir: str | Path | None = None) -> list[dict]:
    seeds = [0, 1, 2] if seeds is None else seeds
    root = Path(run_dir or ("runs/reproduce_adpa_quick" if quick else "runs/reproduce_adpa"))
    return summarize(run_seeds(root, seeds, METHODS, quick))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (quickstart --smoke): wiring only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, help=f"quickstart methods (default: {METHODS})")
    parser.add_argument("--run-dir", default=None, help="default runs/reproduce_adpa[_quick]")
    options = parser.parse_args()
    root = Path(options.run_dir or ("runs/reproduce_adpa_quick" if options.quick else "runs/reproduce_adpa"))
    rows = summarize(run_seeds(root, options.seeds, options.methods, options.quick))
    print("\n" + table(rows))
    (root / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"\nsummary: {root / 'summary.json'}")


if __name__ == "__main__":
    main()
