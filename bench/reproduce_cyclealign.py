"""Reproduce the quickstart's CycleAlign result over seeds: ground-truth reward per cycle, mean ± sd.

For each seed: the quickstart's models, data and SFT student (same stages, so a quickstart run dir is reused), then
CycleAlign's quickstart stage (3 cycles against the noisy oracle). Every cycle's white box (`cycle_<k>/model`) and
the SFT student (cycle 0) are evaluated greedily with the synthetic task's reward on held-out prompts; the loop's
own logs give the agreement (Kendall τ between the black-box and white-box rankings) and the mean reward of each
cycle's samples.

    python bench/reproduce_cyclealign.py                 # seeds 0 1 2
    python bench/reproduce_cyclealign.py --quick         # one seed, 2 short cycles, shorter SFT: a smoke run

Writes `<out>/results.json`, `<out>/results.md` and `<out>/reward_per_cycle.png`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align_distill.pipeline import Pipeline, Stage  # noqa: E402


def stages(seed: int, quick: bool) -> list[Stage]:
    from align_distill.quickstart import base_stages
    from align_distill.quickstart.stages import cyclealign_student

    base = [s for s in base_stages(seed) if s.name in ("models", "data", "student_sft")]
    [cyclealign] = cyclealign_student(seed)
    if quick:
        base[-1].config.update(max_steps=100)
        cyclealign.config.update(cycles=2, prompts_per_cycle=32, num_train_epochs=1)
    return [*base, cyclealign]


def evaluate_cycles(run_dir: Path, cycles: int, n: int) -> dict[str, list]:
    from align_distill.models import load_model, load_tokenizer
    from align_distill.synthetic import evaluate

    folders = [run_dir / "student_sft"] + [
        run_dir / "cyclealign" / f"cycle_{k}" / "model" for k in range(1, cycles + 1)
    ]
    rewards, capability, preference = [], [], []
    for folder in folders:
        result = evaluate(load_model(folder, dtype="float32"), load_tokenizer(folder), n=n)
        rewards.append(result.reward)
        capability.append(result.capability)
        preference.append(result.preference)
    logged = json.loads((run_dir / "cyclealign" / "cycle_metrics.json").read_text())
    return {
        "reward": rewards,
        "capability": capability,
        "preference": preference,
        "agreement_tau": [None] + [c["agreement_tau"] for c in logged],
        "sample_reward": [None] + [c.get("sample_reward") for c in logged],
        "black_box_failures": [None] + [c["black_box_failures"] for c in logged],
    }


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def summarise(per_seed: dict[int, dict[str, list]]) -> dict[str, list]:
    keys = next(iter(per_seed.values())).keys()
    cycles = len(next(iter(per_seed.values()))["reward"])
    return {key: [mean_sd([r[key][k] for r in per_seed.values()]) for k in range(cycles)] for key in keys}


def fmt(pair: tuple[float | None, float | None]) -> str:
    mean, sd = pair
    return "—" if mean is None else f"{mean:.3f} ± {sd:.3f}"


def write_outputs(out: Path, per_seed: dict[int, dict], summary: dict[str, list], wall: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "results.json").write_text(json.dumps({"per_seed": per_seed, "summary": summary, "wall_s": wall}, indent=2))
    cycles = len(summary["reward"])
    lines = [
        f"CycleAlign on the synthetic task, seeds {sorted(per_seed)} (mean ± sd; cycle 0 = the SFT student)",
        "",
        "| cycle | reward (greedy, held out) | capability | preference | agreement τ | sample reward |",
        "|---|---|---|---|---|---|",
    ]
    for k in range(cycles):
        cells = [fmt(summary[key][k]) for key in ("reward", "capability", "preference", "agreement_tau")]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {fmt(summary['sample_reward'][k])} |")
    lines.append(f"\nwall time {wall:.0f} s (shared, loaded CPU machine: timings are noisy)")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = list(range(cycles))
    for key, axis, label in (("reward", left, "reward"), ("agreement_tau", right, "agreement τ")):
        points = [(k, m, s) for k, (m, s) in zip(x, summary[key]) if m is not None]
        axis.errorbar(
            [p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=4
        )
        for seed, result in per_seed.items():
            values = [(k, v) for k, v in zip(x, result[key]) if v is not None]
            axis.plot([v[0] for v in values], [v[1] for v in values], alpha=0.3, linestyle="--", label=f"seed {seed}")
        axis.set_xlabel("cycle (0 = SFT student)")
        axis.set_ylabel(label)
        axis.set_xticks(x)
        axis.legend(fontsize=7)
    left.set_title("ground-truth reward of the white box")
    right.set_title("agreement of black-box and white-box rankings")
    figure.tight_layout()
    figure.savefig(out / "reward_per_cycle.png", dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--quick", action="store_true", help="one seed, 2 short cycles, 100-step SFT student")
    parser.add_argument("--out", default="runs/bench_cyclealign")
    parser.add_argument("--eval-n", type=int, default=None, help="held-out prompts per evaluation (default 200)")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    eval_n = args.eval_n or (50 if args.quick else 200)
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    per_seed = {}
    for seed in seeds:
        recipe = stages(seed, args.quick)
        run_dir = out / f"seed_{seed}"
        Pipeline(run_dir, recipe).run()
        per_seed[seed] = evaluate_cycles(run_dir, recipe[-1].config["cycles"], eval_n)
    summary = summarise(per_seed)
    write_outputs(out, per_seed, summary, time.time() - started)
    return summary


if __name__ == "__main__":
    main()
