"""LLaVA-MoD's preference distillation on the text task: teacher-as-reference DPO vs plain DPO, over seeds.

For each seed, the quickstart's teacher (SFT → DPO, the aligned teacher) and SFT student are trained, then from the
same SFT student, with the same pairs, steps, learning rate and β:

    plain_dpo     TRL DPO, the student's own initialisation as the reference (the quickstart's `student_dpo`)
    teacher_ref   `align-distill train mod --stage pd`: DPO with the aligned teacher as the reference
    mod_full      (--full) the whole LLaVA-MoD chain: d2d → upcycle → d2s → pd (the quickstart's `mod_student`)

and every model is scored with the ground-truth reward (greedy). Prints mean ± sd over seeds and writes
`<run_dir>/results.json`. Stages are cached per seed, so a rerun only evaluates.

    OMP_NUM_THREADS=1 python bench/reproduce_mod.py --quick          # shorter training, 100 eval prompts
    OMP_NUM_THREADS=1 python bench/reproduce_mod.py --seeds 0 1 2 --full
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.reproduce_mod:evaluate` is a pipeline stage

from align_distill.pipeline import Pipeline, Stage
from align_distill.quickstart import COMMON, base_stages, student_dpo
from align_distill.quickstart.stages import mod_student

STEPS = {"teacher_dpo": 60, "student_dpo": 60, "mod_pd": 60}
QUICK_STEPS = {"teacher_sft": 150, "student_sft": 150}


def teacher_ref_stage(seed: int) -> Stage:
    """The pd stage on the dense SFT student, everything else as plain DPO (same steps, lr, β, batch)."""
    plain = student_dpo(seed)[0].config
    return Stage(
        "teacher_ref",
        "train",
        "mod",
        {
            **COMMON,
            "stage": "pd",
            "model_name_or_path": "${student_sft}",
            "teacher_model_name_or_path": "${teacher_dpo}",
            "dataset_name": "${data}/pairs.jsonl",
            "max_steps": plain["max_steps"],
            "learning_rate": plain["learning_rate"],
            "beta": plain["beta"],
            "lr_scheduler_type": "linear",  # TRL DPOConfig's default, as plain DPO
            "warmup_ratio": 0.0,
            "trainable": "all",
            "precompute_ref_log_probs": True,
            "seed": seed,
        },
    )


def evaluate(out: Path, models: dict[str, str], n: int, seed: int = 10_000) -> dict:
    from align_distill.models import load_model, load_tokenizer
    from align_distill.synthetic import evaluate as evaluate_text

    results = {}
    for name, path in models.items():
        results[name] = evaluate_text(
            load_model(path, dtype="float32"), load_tokenizer(path), n=n, seed=seed
        ).as_dict()
    (Path(out) / "eval.json").write_text(json.dumps(results, indent=2))
    return results


def run_seed(run_dir: Path, seed: int, quick: bool, full: bool, n_eval: int) -> dict:
    stages = [s for s in base_stages(seed) if s.name != "teacher_rev_dpo"]  # AlignDistil's, not needed here
    if quick:
        for stage in stages:
            if stage.name in QUICK_STEPS:
                stage.config["max_steps"] = QUICK_STEPS[stage.name]
    stages += [*student_dpo(seed), teacher_ref_stage(seed)]
    models = {
        "teacher_dpo": "${teacher_dpo}",
        "student_sft": "${student_sft}",
        "plain_dpo": "${student_dpo}",
        "teacher_ref": "${teacher_ref}",
    }
    if full:
        stages += mod_student(seed)
        models["mod_full"] = "${mod_pd}"
    stages.append(Stage("evaluate", "call", "bench.reproduce_mod:evaluate", {"models": models, "n": n_eval}))
    pipeline = Pipeline(run_dir / f"seed{seed}", stages)
    pipeline.run()
    return json.loads((pipeline.stage_dir("evaluate") / "eval.json").read_text())


def summarise(per_seed: dict[int, dict]) -> dict[str, dict[str, tuple[float, float]]]:
    names = next(iter(per_seed.values())).keys()
    summary = {}
    for name in names:
        summary[name] = {}
        for metric in ("reward", "capability", "preference"):
            values = [per_seed[s][name][metric] for s in per_seed]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][metric] = (statistics.mean(values), sd)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run-dir", default="runs/reproduce_mod")
    parser.add_argument("--quick", action="store_true", help="shorter teacher/student SFT, 100 eval prompts")
    parser.add_argument("--full", action="store_true", help="also run the full d2d → d2s → pd chain")
    parser.add_argument("--n-eval", type=int, default=None)
    args = parser.parse_args()
    n_eval = args.n_eval or (100 if args.quick else 200)
    run_dir = Path(args.run_dir)
    started = time.time()
    per_seed = {seed: run_seed(run_dir, seed, args.quick, args.full, n_eval) for seed in args.seeds}
    summary = summarise(per_seed)
    print(f"\n{len(args.seeds)} seed(s) {args.seeds}, {n_eval} eval prompts, quick={args.quick}")
    print(f"{'model':14s} {'reward':>15s} {'capability':>15s} {'preference':>15s}")
    for name, metrics in summary.items():
        cells = " ".join(f"{m:7.3f} ± {s:5.3f}" for m, s in metrics.values())
        print(f"{name:14s} {cells}")
    print(f"wall time {time.time() - started:.0f}s")
    (run_dir / "results.json").write_text(json.dumps({"per_seed": per_seed, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
