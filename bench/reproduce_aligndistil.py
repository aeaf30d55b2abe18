"""Reproduce AlignDistil's claims on the quickstart's synthetic task: AlignDistil vs student DPO, several seeds.

Per seed: the quickstart's teacher/student preparation (`quickstart.base_stages`: SFT → DPO and reverse DPO, student
SFT) runs as a cached pipeline under `<run_root>/seed<k>`; then, from the same student SFT model, each method trains
with its quickstart settings (`dpo`: the quickstart's student DPO stage; `aligndistil_off` / `aligndistil_on`: this
quickstart's `aligndistil_off_student` / `aligndistil_on_student`), and the student's greedy ground-truth reward
(`synthetic.evaluate`, held-out prompts) is measured every `eval_every` optimizer steps — the reward-vs-steps curve
that shows convergence speed (paper §6.5: AlignDistil converges faster than sequence- or scalar-reward RL; here the
baseline is DPO on the same pairs).

Writes `<run_root>/results.json` (curves, final rewards, mean ± sd over seeds, steps to reach 90% of the method's
final gain) and `<run_root>/reward_curves.png`; prints a table. `--quick`: one seed, fewer evaluation prompts,
every base stage at `--quick-scale` of its steps (the numbers are then only a smoke check, say so when quoting).

Run: `OMP_NUM_THREADS=1 python -m bench.reproduce_aligndistil [--quick] [--seeds 0 1 2]` (1 thread per process is
much faster on a shared CPU: torch's spinning threads oversubscribe it). `run(quick)` returns the summary rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

METHODS = ("dpo", "aligndistil_off", "aligndistil_on")


def _stages(method: str, seed: int) -> list:
    from align_distill.quickstart import stages

    if method == "dpo":
        return stages.METHOD_STAGES["dpo"](seed)
    return stages.aligndistil_off_student(seed) if method == "aligndistil_off" else stages.aligndistil_on_student(seed)


def prepare(run_dir: Path, seed: int, scale: float) -> Any:
    """The quickstart's base stages for `seed` (cached by fingerprint), max_steps scaled by `scale`."""
    from align_distill.pipeline import Pipeline
    from align_distill.quickstart import base_stages

    stages = base_stages(seed)
    for stage in stages:
        if scale != 1.0 and "max_steps" in stage.config:
            stage.config["max_steps"] = max(2, round(stage.config["max_steps"] * scale))
    pipeline = Pipeline(run_dir, stages)
    pipeline.run()
    return pipeline


def train_method(pipeline: Any, method: str, seed: int, every: int, n: int) -> list[dict]:
    """Train `method` from the seed's student SFT model with its quickstart config; return its reward curve."""
    from align_distill.quickstart.curves import train_with_curve

    (stage,) = _stages(method, seed)
    return train_with_curve(stage.target, pipeline.resolve(stage), pipeline.run_dir / f"curve_{method}", every, n)


def summarize(results: dict[str, dict[str, list[dict]]], bases: dict[str, dict]) -> list[dict]:
    from align_distill.quickstart.curves import steps_to_90

    rows = []
    methods = sorted({m for per_seed in results.values() for m in per_seed}, key=list(METHODS).index)
    for method in methods:
        curves = [per_seed[method] for per_seed in results.values() if method in per_seed]
        finals = [c[-1]["reward"] for c in curves]
        prefs = [c[-1]["preference"] for c in curves]
        caps = [c[-1]["capability"] for c in curves]
        speeds = [steps_to_90(c) for c in curves]
        rows.append(
            {
                "bench": "reproduce_aligndistil",
                "method": method,
                "seeds": len(curves),
                "reward_mean": statistics.mean(finals),
                "reward_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "preference_mean": statistics.mean(prefs),
                "capability_mean": statistics.mean(caps),
                "start_reward_mean": statistics.mean(c[0]["reward"] for c in curves),
                "steps_to_90pct": speeds,
            }
        )
    for name in ("teacher_dpo", "student_sft"):
        values = [b[name]["reward"] for b in bases.values()]
        rows.append(
            {
                "bench": "reproduce_aligndistil",
                "method": f"({name})",
                "seeds": len(values),
                "reward_mean": statistics.mean(values),
                "reward_sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "preference_mean": statistics.mean(b[name]["preference"] for b in bases.values()),
                "capability_mean": statistics.mean(b[name]["capability"] for b in bases.values()),
            }
        )
    return rows


def reproduce(
    run_root: Path, seeds: list[int], methods: list[str], every: int, n: int, scale: float
) -> tuple[list[dict], dict]:
    from align_distill.models import load_model, load_tokenizer
    from align_distill.quickstart.curves import plot_curves
    from align_distill.synthetic import evaluate

    run_root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {}
    bases: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for seed in seeds:
        started = time.time()
        pipeline = prepare(run_root / f"seed{seed}", seed, scale)
        timings[f"seed{seed}/base"] = time.time() - started
        bases[str(seed)] = {}
        for name in ("teacher_dpo", "student_sft"):
            folder = pipeline.stage_dir(name)
            bases[str(seed)][name] = evaluate(
                load_model(folder, dtype="float32"), load_tokenizer(folder), n=n
            ).as_dict()
        results[str(seed)] = {}
        for method in methods:
            started = time.time()
            results[str(seed)][method] = train_method(pipeline, method, seed, every, n)
            timings[f"seed{seed}/{method}"] = time.time() - started
            print(f"seed {seed} {method}: {results[str(seed)][method]}", flush=True)
    rows = summarize(results, bases)
    record = {"seeds": seeds, "eval_every": every, "eval_n": n, "step_scale": scale, "timings_s": timings}
    record.update({"curves": results, "bases": bases, "summary": rows})
    (run_root / "results.json").write_text(json.dumps(record, indent=2))
    plot_curves(results, run_root / "reward_curves.png", "Student alignment from the same SFT model")
    return rows, record


def _print(rows: list[dict]) -> None:
    print(f"{'method':<20}{'seeds':>6}{'reward':>16}{'preference':>12}{'capability':>12}  steps to 90% of gain")
    for r in rows:
        reward = f"{r['reward_mean']:.3f} ± {r['reward_sd']:.3f}"
        print(
            f"{r['method']:<20}{r['seeds']:>6}{reward:>16}{r['preference_mean']:>12.3f}{r['capability_mean']:>12.3f}"
            f"  {r.get('steps_to_90pct', '')}"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 64 eval prompts, base stages at --quick-scale")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--run-root", default="runs/reproduce_aligndistil")
    p.add_argument("--eval-every", type=int, default=10, help="optimizer steps between reward measurements")
    p.add_argument("--eval-n", type=int, default=None, help="held-out prompts per measurement (200; quick 64)")
    p.add_argument("--quick-scale", type=float, default=0.5, help="base stages' max_steps factor in --quick")
    return p


def _options(argv: list[str] | None) -> argparse.Namespace:
    opts = _parser().parse_args(argv)
    opts.seeds = opts.seeds or ([0] if opts.quick else [0, 1, 2])
    opts.eval_n = opts.eval_n or (64 if opts.quick else 200)
    opts.scale = opts.quick_scale if opts.quick else 1.0
    if opts.quick and opts.run_root == _parser().get_default("run_root"):
        opts.run_root += "_quick"
    return opts


def run(quick: bool = True) -> list[dict]:
    opts = _options(["--quick"] if quick else [])
    return reproduce(Path(opts.run_root), opts.seeds, opts.methods, opts.eval_every, opts.eval_n, opts.scale)[0]


def main(argv: list[str] | None = None) -> None:
    opts = _options(argv)
    rows, _ = reproduce(Path(opts.run_root), opts.seeds, opts.methods, opts.eval_every, opts.eval_n, opts.scale)
    _print(rows)
    print(f"\nresults: {Path(opts.run_root) / 'results.json'}   curves: {Path(opts.run_root) / 'reward_curves.png'}")


if __name__ == "__main__":
    main()
