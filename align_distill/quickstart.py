"""`align-distill quickstart`: the whole story on a CPU in minutes, as a pipeline of cached stages.

Tiny teacher (bigger) and student (smaller) share one locally trained tokenizer. The teacher is prepared the way
the methods need it — SFT (the reference teacher), DPO (the aligned teacher), reverse DPO (AlignDistil's
contrast) — the student gets SFT, then each distillation method runs and every model is scored with the
synthetic task's ground-truth reward. Rerunning reuses finished stages (fingerprints), `--from` reruns from one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align_distill.pipeline import Pipeline, Stage

# Training settings shared by every quickstart stage: fp32 on CPU, no checkpoints, progress bars on.
COMMON: dict[str, Any] = {
    "bf16": False,
    "gradient_checkpointing": False,
    "save_strategy": "no",
    "report_to": "none",
    "logging_steps": 25,
    "max_length": 64,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
    "per_device_train_batch_size": 32,
}


# Shared by the teacher's and the student's stages (only the step budgets differ).
SFT_SCHEDULE: dict[str, Any] = {"learning_rate": 3e-3, "lr_scheduler_type": "cosine", "warmup_steps": 10}
DPO_SETTINGS: dict[str, Any] = {"max_steps": 60, "learning_rate": 5e-5, "beta": 0.1}


def build_models(out_dir: Path, seed: int = 0) -> dict[str, str]:
    """Stage `models`: tokenizer + random tiny teacher and student under `out_dir`."""
    from align_distill.models.tiny import make_tiny_models

    return {name: str(path) for name, path in make_tiny_models(out_dir, seed=seed).items()}


def write_data(out_dir: Path, seed: int = 0, n_sft: int = 4000, n_pairs: int = 1000, n_prompts: int = 256) -> dict:
    """Stage `data`: the synthetic task's SFT rows, preference pairs and prompts as JSONL."""
    from align_distill import synthetic

    files = {
        "sft.jsonl": synthetic.sft_rows(n_sft, seed=seed),
        "pairs.jsonl": synthetic.preference_rows(n_pairs, seed=seed + 1),
        "prompts.jsonl": synthetic.prompt_rows(n_prompts, seed=seed + 2),
    }
    for name, rows in files.items():
        with open(out_dir / name, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return {name: len(rows) for name, rows in files.items()}


def evaluate_models(
    out_dir: Path, models: dict[str, str], n: int = 200, seed: int = 10_000, curves: str | None = None
) -> dict[str, dict]:
    """Stage `evaluate`: greedy ground-truth reward of every model; writes `eval.json`, `report.md`, `reward.png`
    (and copies the `convergence` stage's reward-vs-steps chart into the report when `curves` names it)."""
    from align_distill.models import load_model, load_tokenizer
    from align_distill.report import write_report
    from align_distill.synthetic import evaluate

    results: dict[str, dict] = {}
    for name, path in models.items():
        model = load_model(path, dtype="float32")
        results[name] = evaluate(model, load_tokenizer(path), n=n, seed=seed).as_dict()
        print(f"  {name:18s} reward {results[name]['reward']:.3f}", flush=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    curve_data = None
    if curves is not None:
        (out_dir / CURVES_PNG).write_bytes((Path(curves) / CURVES_PNG).read_bytes())
        curve_data = json.loads((Path(curves) / "curves.json").read_text())
    write_report(out_dir, results, models, curves=curve_data, curves_png=CURVES_PNG if curves else None)
    return results


def _train(name: str, method: str, **config: Any) -> Stage:
    return Stage(name=name, kind="train", target=method, config={**COMMON, **config})


def base_stages(seed: int) -> list[Stage]:
    """Teacher preparation (SFT → DPO, reverse DPO) and the student SFT baseline."""
    return [
        Stage("models", "call", "align_distill.quickstart:build_models", {"seed": seed}),
        Stage(
            "data",
            "call",
            "align_distill.quickstart:write_data",
            {"seed": seed, "n_sft": 4000, "n_pairs": 1000, "n_prompts": 256},
        ),
        _train(
            "teacher_sft",
            "sft",
            model_name_or_path="${models}/teacher",
            dataset_path="${data}/sft.jsonl",
            max_steps=400,
            seed=seed,
            **SFT_SCHEDULE,
        ),
        _train(
            "teacher_dpo",
            "dpo",
            model_name_or_path="${teacher_sft}",
            dataset_path="${data}/pairs.jsonl",
            **DPO_SETTINGS,
            seed=seed,
        ),
        _train(
            "teacher_rev_dpo",
            "dpo",
            model_name_or_path="${teacher_sft}",
            dataset_path="${data}/pairs.jsonl",
            **DPO_SETTINGS,
            reverse=True,
            seed=seed,
        ),
        _train(
            "student_sft",
            "sft",
            model_name_or_path="${models}/student",
            dataset_path="${data}/sft.jsonl",
            # a smaller SFT budget than the teacher's: at 400 steps this task saturates even the tiny student
            # (capability 0.93, as high as the teacher's), leaving nothing for distillation to show
            max_steps=200,
            seed=seed,
            **SFT_SCHEDULE,
        ),
    ]


def _student_dpo(seed: int) -> list[Stage]:
    return [
        _train(
            "student_dpo",
            "dpo",
            model_name_or_path="${student_sft}",
            dataset_path="${data}/pairs.jsonl",
            **DPO_SETTINGS,
            seed=seed,
        )
    ]


def _method_stages(module: str, function: str = "quickstart_stages") -> Callable[[int], list[Stage]]:
    """Stages a method module contributes (imported only when the quickstart is built)."""

    def stages(seed: int) -> list[Stage]:
        import importlib

        return getattr(importlib.import_module(f"align_distill.methods.{module}"), function)(seed)

    return stages


# Each distillation method adds its stages here; the evaluated model is the last stage's output.
METHOD_STAGES: dict[str, Callable[[int], list[Stage]]] = {
    "dpo": _student_dpo,
    "dckd": _method_stages("dckd"),
    "adpa": _method_stages("adpa"),
    "adpa_plus": _method_stages("adpa", "quickstart_stages_plus"),
    "aligndistil": _method_stages("aligndistil"),
    "aligndistil_on": _method_stages("aligndistil", "quickstart_stages_on"),
    "mod": _method_stages("mod"),
    "cyclealign": _method_stages("cyclealign"),
}

# Models every report shows, in table order: (label, stage).
BASE_MODELS = [
    ("teacher_sft (ref)", "teacher_sft"),
    ("teacher_dpo", "teacher_dpo"),
    ("teacher_rev_dpo", "teacher_rev_dpo"),
    ("student_sft", "student_sft"),
]


# The `convergence` stage retrains these stages (label: stage name) measuring reward vs steps (DPO vs AlignDistil).
CURVE_STAGES = {"student_dpo": "student_dpo", "aligndistil_off": "aligndistil_off", "aligndistil_on": "aligndistil_on"}
CURVES_PNG = "reward_vs_steps.png"

SMOKE_OVERRIDES = {"max_steps": 2, "n_sft": 64, "n_pairs": 32, "n_prompts": 16, "n": 8}


def _smoke_config(config: dict[str, Any], train: bool) -> dict[str, Any]:
    config = {k: SMOKE_OVERRIDES.get(k, v) for k, v in config.items()}
    if train:
        config["max_steps"] = SMOKE_OVERRIDES["max_steps"]
    if "runs" in config:  # the convergence stage's nested training configs
        config["runs"] = {
            label: {**run, "config": _smoke_config(run["config"], train=True)} for label, run in config["runs"].items()
        }
    return config


def _smoke(stage: Stage) -> Stage:
    """The same stage at toy size: every size-like key present in its config is replaced (tests, CI)."""
    return Stage(stage.name, stage.kind, stage.target, _smoke_config(stage.config, stage.kind == "train"))


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
        stages.extend(method_stages)
        models[f"student_{method}" if not method.startswith("student") else method] = f"${{{method_stages[-1].name}}}"
    evaluate = {"models": models, "n": 200}
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
            "align_distill.synthetic.curves:reward_curves",
            {"runs": curve_runs, "every": 10, "n": 200},
        )
        stages.append(curves)
        evaluate["curves"] = "${convergence}"
    stages.append(Stage("evaluate", "call", "align_distill.quickstart:evaluate_models", evaluate))
    return Pipeline(run_dir, [_smoke(s) for s in stages] if smoke else stages)


def run_quickstart(
    run_dir: str | Path = "runs/quickstart",
    methods: list[str] | None = None,
    seed: int = 0,
    from_stage: str | None = None,
    smoke: bool = False,
) -> dict[str, dict]:
    import os
    import time

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        # Tiny models gain nothing from intra-op threads and lose a lot when the cores are shared (measured: the
        # teacher's SFT ran 4.4 steps/s on one thread vs ~1 step/s on two on a busy 2-core machine).
        torch.set_num_threads(1)
    started = time.time()
    pipeline = build_pipeline(run_dir, methods=methods, seed=seed, smoke=smoke)
    pipeline.run(from_stage=from_stage)
    evaluate_dir = pipeline.stage_dir("evaluate")
    results = json.loads((evaluate_dir / "eval.json").read_text())
    for name in ("report.md", "reward.png", CURVES_PNG):
        if (evaluate_dir / name).exists():
            (Path(run_dir) / name).write_bytes((evaluate_dir / name).read_bytes())
    from align_distill.report import results_table

    print("\n" + results_table(results))
    print(
        f"\nreport: {Path(run_dir) / 'report.md'}   chart: {Path(run_dir) / 'reward.png'}   "
        f"wall time: {time.time() - started:.0f}s"
    )
    return results
