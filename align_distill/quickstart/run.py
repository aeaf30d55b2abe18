"""`align-distill quickstart`: the whole story on a CPU in minutes, as a pipeline of cached stages.

Tiny teacher (bigger) and student (smaller) share one locally trained tokenizer. The teacher is prepared the way
the methods need it — SFT (the reference teacher), DPO (the aligned teacher), reverse DPO (AlignDistil's
contrast) — the student gets SFT, then each distillation method runs and every model is scored with the
synthetic task's ground-truth reward (an `evaluate` stage: `align_distill.evaluation` with the task's checker).
Rerunning reuses finished stages (fingerprints), `--from` reruns from one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align_distill import configuration, synthetic
from align_distill.models.tiny import make_tiny_models
from align_distill.pipeline import INLINE, Pipeline, Stage
from align_distill.run_files import EVAL_FILE

from .report import results_table, write_report
from .stages import BASE_MODELS, CURVE_STAGES, CURVES_PNG, METHOD_STAGES, _smoke, base_stages


def build_models(out_dir: Path, seed: int = 0) -> dict[str, str]:
    """Stage `models`: tokenizer + random tiny teacher and student under `out_dir`."""

    return {name: str(path) for name, path in make_tiny_models(out_dir, seed=seed).items()}


def write_data(out_dir: Path, seed: int = 0, n_sft: int = 4000, n_pairs: int = 1000, n_prompts: int = 256) -> dict:
    """Stage `data`: the synthetic task's SFT rows, preference pairs and prompts as JSONL (train split only)."""

    files = synthetic.task_data(seed, n_sft=n_sft, n_pairs=n_pairs, n_prompts=n_prompts)
    for name, rows in files.items():
        with open(out_dir / name, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return {name: len(rows) for name, rows in files.items()}


def write_test_prompts(out_dir: Path, seed: int = 0, n: int | None = None) -> dict[str, int]:
    """Stage `test_prompts`: the first `n` (default all) distinct prompts of `seed`'s test split, each one user
    turn, as `prompts.jsonl` (the `evaluate` stage's prompt set; no training file contains them)."""

    texts = synthetic.evaluation_prompts("test", seed, n)
    with open(out_dir / "prompts.jsonl", "w") as handle:
        for index, text in enumerate(texts):
            handle.write(json.dumps({"id": f"test-{seed}-{index}", "prompt": [{"role": "user", "content": text}]}))
            handle.write("\n")
    return {"prompts.jsonl": len(texts)}


def evaluate_stage(models: dict[str, str], prompts: str) -> Stage:
    """Stage `evaluate`: every model's greedy answers (the transformers backend, batches of 64, fp32: the
    quickstart's numbers since the start) scored by the synthetic task's ground truth; `eval.json` holds each
    model's reward, capability, preference and n."""
    return Stage(
        "evaluate",
        "evaluate",
        INLINE,
        {
            "prompts": prompts,
            "models": {
                label: {"model": path, "backend_kwargs": {"batch_size": 64, "dtype": "float32"}}
                for label, path in models.items()
            },
            "generation": {"max_completion_length": 24, "shard_size": 64},
            "checkers": {"task": "align_distill.evaluation.checkers:synthetic_task"},
        },
    )


def write_run_report(
    out_dir: Path,
    scores: str,
    models: dict[str, str],
    curves: str | None = None,
    smoke: bool = False,
) -> dict[str, dict]:
    """Stage `report`: the quickstart's table and chart from the `evaluate` stage's `eval.json` (`scores`); writes
    `report.md` and `reward.png`, and copies the `convergence` stage's reward-vs-steps chart into the report when
    `curves` names it. `smoke`: the report and chart say it is a smoke run (toy sizes)."""

    results = json.loads((Path(scores) / EVAL_FILE).read_text())
    for name, metrics in results.items():
        print(f"  {name:18s} reward {metrics['reward']:.3f}", flush=True)
    curve_data = None
    if curves is not None:
        (out_dir / CURVES_PNG).write_bytes((Path(curves) / CURVES_PNG).read_bytes())
        curve_data = json.loads((Path(curves) / "curves.json").read_text())
    write_report(out_dir, results, models, curves=curve_data, curves_png=CURVES_PNG if curves else None, smoke=smoke)
    return results


def build_pipeline(
    run_dir: str | Path, methods: list[str] | None = None, seed: int = 0, smoke: bool = False
) -> Pipeline:
    chosen = list(METHOD_STAGES) if methods is None else methods
    unknown = [m for m in chosen if m not in METHOD_STAGES]
    if unknown:
        raise SystemExit(f"quickstart: unknown methods {unknown}; available: {', '.join(METHOD_STAGES)}")
    stages = base_stages(seed)
    models = {label: f"${{{stage}}}" for label, stage in BASE_MODELS}
    for method in chosen:
        method_stages = METHOD_STAGES[method](seed)
        for stage in method_stages:
            shared = next((s for s in stages if s.name == stage.name), None)
            if shared is None:
                stages.append(stage)
            elif shared.config != stage.config:  # a shared stage (e.g. the teacher's signals) must be the same stage
                raise ValueError(f"quickstart: two methods define stage {stage.name!r} differently")
        models[f"student_{method}" if not method.startswith("student") else method] = f"${{{method_stages[-1].name}}}"
    prompts = Stage(
        "test_prompts",
        "call",
        "align_distill.quickstart:write_test_prompts",
        {"seed": seed, "n": synthetic.EVAL_SIZES["test"]},
    )
    stages += [prompts, evaluate_stage(models, "${test_prompts}/prompts.jsonl")]
    report = {"scores": "${evaluate}", "models": models}
    by_name = {stage.name: stage for stage in stages}
    curve_runs = {
        label: {"method": by_name[name].target, "config": by_name[name].config}
        for label, name in CURVE_STAGES.items()
        if name in by_name
    }
    if "student_dpo" in curve_runs and len(curve_runs) > 1:  # DPO vs at least one AlignDistil variant
        curves = Stage(
            "convergence",
            "call",
            "align_distill.quickstart.curves:reward_curves",
            {"runs": curve_runs, "every": 10, "n": 200},
        )
        stages.append(curves)
        report["curves"] = "${convergence}"
    if smoke:  # only then, so a full run's report fingerprint is unchanged
        report["smoke"] = True
    stages.append(Stage("report", "call", "align_distill.quickstart:write_run_report", report))
    return Pipeline(run_dir, [_smoke(s) for s in stages] if smoke else stages)


def run_quickstart(
    run_dir: str | Path = "runs/quickstart",
    methods: list[str] | None = None,
    seed: int = 0,
    from_stage: str | None = None,
    smoke: bool = False,
) -> dict[str, dict]:

    if "OMP_NUM_THREADS" not in os.environ:
        # Tiny models gain nothing from intra-op threads and lose a lot when the cores are shared (measured: the
        # teacher's SFT ran 4.4 steps/s on one thread vs ~1 step/s on two on a busy 2-core machine).
        torch.set_num_threads(1)
    started = time.time()
    pipeline = build_pipeline(run_dir, methods=methods, seed=seed, smoke=smoke)
    pipeline.run(from_stage=from_stage)
    results = json.loads((pipeline.stage_dir("evaluate") / EVAL_FILE).read_text())
    report_dir = pipeline.stage_dir("report")
    for name in ("report.md", "reward.png", CURVES_PNG):
        if (report_dir / name).exists():
            (Path(run_dir) / name).write_bytes((report_dir / name).read_bytes())

    print("\n" + results_table(results))
    print("(one seed, on its test split: whether the wiring works, not which method is better; see docs/results.md)")
    print(
        f"\nreport: {Path(run_dir) / 'report.md'}   chart: {Path(run_dir) / 'reward.png'}   "
        f"wall time: {time.time() - started:.0f}s"
    )
    return results


@dataclass
class QuickstartSettings:
    """The quickstart's settings: flags, a YAML file (`--config FILE`) or `--key value` overrides."""

    run_dir: str = field(default="runs/quickstart", metadata={"help": "Run folder (finished stages are reused)."})
    methods: list[str] | None = field(
        default=None,
        metadata={"help": f"Methods to run, e.g. `dckd,adpa` (default: all: {', '.join(METHOD_STAGES)})."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the tiny models and the synthetic data."})
    from_stage: str | None = field(default=None, metadata={"help": "Rerun this stage and every later one (--from)."})
    smoke: bool = field(default=False, metadata={"help": "Toy sizes (2 steps per stage): checks the wiring in 1 min."})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods or [] if m not in METHOD_STAGES]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; available: {', '.join(METHOD_STAGES)}")


QUICKSTART_USAGE = (
    "usage: align-distill quickstart [--config FILE] [--run-dir DIR] [--methods M ...] [--seed N] [--from STAGE] "
    "[--smoke]"
)


def quickstart_command(argv: list[str]) -> int:
    """`align-distill quickstart [options]`; returns the exit code. Options are `QuickstartSettings` keys, given as
    flags (`--run-dir runs/q`, `--methods dckd adpa` or `--methods dckd,adpa`, `--from STAGE`, `--smoke`) or in a
    YAML file (`--config FILE`)."""
    if "-h" in argv or "--help" in argv:
        print(configuration.describe_dataclass(QuickstartSettings, QUICKSTART_USAGE))
        return 0
    config, rest = configuration.split_config_argument(argv)
    arguments = [("--from_stage" + a[len("--from") :]) if a.split("=")[0] == "--from" else a for a in rest]
    settings = configuration.load_dataclasses((QuickstartSettings,), config, arguments, "quickstart")[0]
    run_quickstart(**dataclasses.asdict(settings))
    return 0
