"""Reproduce every method's claim on the synthetic task under one protocol, and write the evidence as JSON.

    python -m bench.reproduce all                  # every family: adpa, aligndistil, mod, cyclealign, quickstart
    python -m bench.reproduce adpa mod --jobs 2
    python -m bench.reproduce all --quick          # toy sizes, 2 seeds: checks the wiring, meaningless numbers

The protocol (docs/results.md says it in full):
- Splits: each seed's tiny teacher pair, SFT student and data come from the quickstart's stages; the data use only
  the task's train prompts; learning rates are chosen on the validation split; every reported number is on the
  test split (`synthetic.task_splits(seed)`: disjoint by construction).
- Matched budgets: every student method trains `STUDENT_STEPS` optimizer steps from the same SFT student (chains
  split them), and is run at both student SFT budgets (`SFT_BUDGETS`).
- Matched tuning: every method gets the same learning-rate grid size, its centre learning rate × `LR_FACTORS`; on
  the first `--tuning-seeds` seeds all of them run and the factor with the best mean validation reward is kept
  (per method and SFT budget); the other seeds run the kept factor only.
- Controls: `dpo` (the student's own DPO, tuned like every method) and `sft_chosen` (DCKD's and ADPA's SFT term
  alone: DCKD's trainer with both KL weights 0).
- Statistics: per comparison, the paired mean difference over seeds on the test split with a bootstrap 95 %
  interval and the number of seeds on each side (`bench/stats.py`).

Every stage is cached by fingerprint under `--run-root` (`runs/reproduce`), so an interrupted run resumes and a
repeated one only re-reads. Seeds run in parallel worker processes (`--jobs`, one torch thread each). Writes
`bench/reproductions/<family>.json`; `python -m bench.render_results` turns them into docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.stats import paired_difference

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "reproductions"

FAMILIES: dict[str, tuple[str, ...]] = {
    "adpa": ("dpo", "sft_chosen", "dckd", "adpa", "adpa_plus"),
    "aligndistil": ("dpo", "aligndistil", "aligndistil_on"),
    "mod": ("dpo", "teacher_ref", "mod"),
    "cyclealign": ("dpo", "sft_chosen", "cyclealign"),
    "kd": (
        "dpo",
        "kd_forward_kl",
        "kd_reverse_kl",
        "kd_jsd",
        "kd_skew_kl",
        "kd_akl",
        "kd_taid",
        "trl_forward_kl",
        "trl_jsd",
        "trl_reverse_kl",
    ),
}
# `kd` (on-policy, the divergence family) and TRL's DistillationTrainer with the same divergence: loss parameters.
KD_METHODS: dict[str, dict[str, Any]] = {
    "kd_forward_kl": {"divergence": "forward_kl"},
    "kd_reverse_kl": {"divergence": "reverse_kl"},
    "kd_jsd": {"divergence": "jsd", "beta": 0.5},
    "kd_skew_kl": {"divergence": "skew_forward_kl", "alpha": 0.1},
    "kd_akl": {"divergence": "akl", "mu": 0.5},
    "kd_taid": {"divergence": "taid"},
}
TRL_METHODS: dict[str, float] = {"trl_forward_kl": 0.0, "trl_jsd": 0.5, "trl_reverse_kl": 1.0}  # TRL's beta
# Families run at fewer student SFT budgets than `SFT_BUDGETS` (the others run at all of them).
FAMILY_BUDGETS: dict[str, tuple[int, ...]] = {"kd": (200,)}
# (method, baseline): the comparisons each family's claim rests on, method − baseline.
COMPARISONS: dict[str, tuple[tuple[str, str], ...]] = {
    "adpa": (
        ("dckd", "sft_chosen"),
        ("adpa", "sft_chosen"),
        ("adpa_plus", "sft_chosen"),
        ("dckd", "dpo"),
        ("adpa", "dpo"),
        ("adpa", "dckd"),
        ("adpa_plus", "adpa"),
        ("adpa_plus", "dckd"),
    ),
    "aligndistil": (("aligndistil", "dpo"), ("aligndistil_on", "dpo"), ("aligndistil_on", "aligndistil")),
    "mod": (("teacher_ref", "dpo"), ("mod", "dpo"), ("mod", "teacher_ref")),
    "cyclealign": (("cyclealign", "dpo"), ("cyclealign", "sft_chosen")),
    "kd": (
        ("kd_forward_kl", "trl_forward_kl"),
        ("kd_jsd", "trl_jsd"),
        ("kd_reverse_kl", "trl_reverse_kl"),
        ("kd_forward_kl", "dpo"),
        ("kd_reverse_kl", "kd_forward_kl"),
        ("kd_jsd", "kd_forward_kl"),
        ("kd_skew_kl", "kd_forward_kl"),
        ("kd_akl", "kd_forward_kl"),
        ("kd_taid", "kd_forward_kl"),
    ),
}
LR_FACTORS = (0.25, 1.0, 4.0)
SFT_BUDGETS = (200, 400)
SEEDS = tuple(range(10))
TUNING_SEEDS = 3
METRICS = ("reward", "capability", "preference")
BASE_MODELS = ("teacher_sft", "teacher_dpo", "teacher_rev_dpo")
QUICK_EVAL = {"validation": 16, "test": 32}


def teacher_ref_student(seed: int) -> list:
    """LLaVA-MoD's preference stage alone on the dense SFT student: DPO with the aligned teacher as the reference,
    everything else as the student's own DPO (same steps, learning rate, β, schedule)."""
    from align_distill.pipeline import Stage
    from align_distill.quickstart.stages import COMMON, STUDENT_DPO

    config = {
        **COMMON,
        "stage": "pd",
        "model_name_or_path": "${student_sft}",
        "teacher_model_name_or_path": "${teacher_dpo}",
        "dataset_name": "${data}/pairs.jsonl",
        "max_steps": STUDENT_DPO["max_steps"],
        "learning_rate": STUDENT_DPO["learning_rate"],
        "beta": STUDENT_DPO["beta"],
        "lr_scheduler_type": "linear",  # TRL DPOConfig's default, as the student's DPO
        "warmup_ratio": 0.0,
        "trainable": "all",
        "precompute_ref_log_probs": True,
        "seed": seed,
    }
    return [Stage("teacher_ref", "train", "mod", config)]


def trl_student(name: str, beta: float) -> Callable[[int], list]:
    """TRL's DistillationTrainer (bench/trl_distillation.py) with the `kd` stages' student, teacher, prompts, steps,
    batch, completion length and learning rate."""

    def stages(seed: int) -> list:
        from align_distill.pipeline import Stage
        from align_distill.quickstart.stages import COMMON, KD

        config = {
            "model_name_or_path": "${student_sft}",
            "teacher_model_name_or_path": "${teacher_dpo}",
            "dataset_name": "${data}/prompts.jsonl",
            "max_steps": KD["max_steps"],
            "learning_rate": KD["learning_rate"],
            "beta": beta,
            "seed": seed,
            "per_device_train_batch_size": COMMON["per_device_train_batch_size"],
            "max_completion_length": KD["max_completion_length"],
            "temperature": KD["temperature"],
        }
        return [Stage(name, "call", "bench.trl_distillation:train", config)]

    return stages


def method_builders() -> dict[str, Callable[[int], list]]:
    from functools import partial

    from align_distill.quickstart.stages import METHOD_STAGES, kd_stages

    kd = {name: partial(kd_stages, name, **loss) for name, loss in KD_METHODS.items()}
    trl = {name: trl_student(name, beta) for name, beta in TRL_METHODS.items()}
    return {**METHOD_STAGES, "teacher_ref": teacher_ref_student, **kd, **trl}


def student_stage(sft_steps: int) -> str:
    from align_distill.quickstart.stages import STUDENT_SFT_STEPS

    return "student_sft" if sft_steps == STUDENT_SFT_STEPS else f"student_sft_{sft_steps}"


def factor_tag(factor: float) -> str:
    return "lrx" + f"{factor:g}".replace(".", "p")


def variant_stages(method: str, seed: int, sft_steps: int, factor: float) -> list:
    """`method`'s stages started from the `sft_steps` SFT student with every learning rate × `factor`, renamed so
    that variants live side by side in one run folder: a stage is suffixed with the SFT budget when it depends on the
    student, and with the factor when it depends on a learning rate; stages that depend on neither (the teacher's
    signals on the data) keep one name and are shared."""
    from align_distill.pipeline import Stage, references, rename_references

    stages = method_builders()[method](seed)
    lr_dependent: set[str] = set()
    student_dependent: set[str] = set()
    for stage in stages:
        refs = set(references(stage))
        if stage.kind == "train" or "learning_rate" in stage.config or refs & lr_dependent:
            lr_dependent.add(stage.name)
        if "student_sft" in refs or refs & student_dependent:
            student_dependent.add(stage.name)
    rename = {"student_sft": student_stage(sft_steps)}
    for stage in stages:
        suffix = f"_sft{sft_steps}" if stage.name in student_dependent else ""
        suffix += f"_{factor_tag(factor)}" if stage.name in lr_dependent else ""
        rename[stage.name] = stage.name + suffix
    renamed = []
    for stage in stages:
        config = rename_references(stage.config, rename)
        if "learning_rate" in config and (stage.kind == "train" or stage.name in lr_dependent):
            config["learning_rate"] = config["learning_rate"] * factor
        renamed.append(Stage(rename[stage.name], stage.kind, stage.target, config))
    return renamed


def base_stages(seed: int) -> list:
    """The quickstart's teacher pair and SFT student, plus the SFT student at every other budget of `SFT_BUDGETS`."""
    from align_distill.pipeline import Stage
    from align_distill.quickstart import base_stages as quickstart_base

    stages = quickstart_base(seed)
    student = next(s for s in stages if s.name == "student_sft")
    for steps in SFT_BUDGETS:
        if student_stage(steps) != "student_sft":
            stages.append(Stage(student_stage(steps), "train", "sft", {**student.config, "max_steps": steps}))
    return stages


def _optimizer_steps(pipeline: Any, stages: list) -> int:
    """Optimizer steps of a variant's training stages: `max_steps` (honoured exactly), CycleAlign's from its logs."""
    total = 0
    for stage in stages:
        if "max_steps" not in stage.config and stage.target != "cyclealign":
            continue
        if stage.target == "cyclealign":
            logged = json.loads((pipeline.stage_dir(stage.name) / "cycle_metrics.json").read_text())
            total += sum(int(cycle["train_steps"]) for cycle in logged)
        else:
            total += int(stage.config["max_steps"])
    return total


def _evaluate(folder: Path, seed: int, quick: bool) -> dict[str, float]:
    """Validation and test metrics of the model in `folder`, cached in its `eval.json` (a rerun stage replaces the
    folder, so a cached result is always the current model's)."""
    cached = folder / "eval.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from align_distill.models import load_model, load_tokenizer
    from align_distill.synthetic import evaluate

    model, tokenizer = load_model(folder, dtype="float32"), load_tokenizer(folder)
    result: dict[str, float] = {}
    for split in ("validation", "test"):
        n = QUICK_EVAL[split] if quick else None
        metrics = evaluate(model, tokenizer, n=n, seed=seed, split=split).as_dict()
        result.update({f"{split}_{k}": metrics[k] for k in (*METRICS, "n")})
    temporary = folder / "eval.json.tmp"
    temporary.write_text(json.dumps(result, indent=2))
    temporary.replace(cached)
    return result


def run_worker(
    seed: int, sft_steps: int | None, variants: list[tuple[str, float]], run_root: Path, quick: bool
) -> None:
    """One worker process: the seed's base stages, then the given (method, factor) variants at `sft_steps`, every
    final model evaluated. With `sft_steps` None: the base stages only, and the base models evaluated."""
    import torch

    from align_distill.pipeline import Pipeline
    from align_distill.quickstart.stages import _smoke

    torch.set_num_threads(1)
    stages = base_stages(seed)
    finals = [s.name for s in stages if s.name in BASE_MODELS or s.name.startswith("student_sft")]
    if sft_steps is not None:
        finals = []
        names = {s.name for s in stages}
        for method, factor in variants:
            added = variant_stages(method, seed, sft_steps, factor)
            stages.extend(s for s in added if s.name not in names)
            names.update(s.name for s in added)
            finals.append(added[-1].name)
    pipeline = Pipeline(run_root / f"seed{seed}", [_smoke(s) for s in stages] if quick else stages)
    pipeline.run()
    for name in finals:
        _evaluate(pipeline.stage_dir(name), seed, quick)


def _launch(task: list[str], run_root: Path, log_name: str) -> None:
    logs = run_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{log_name}.log"
    started = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "bench.reproduce", "--worker", *task, "--run-root", str(run_root)],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**_env(), "OMP_NUM_THREADS": "1"},
        )
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"worker {log_name} failed (exit {done.returncode}); log {log}:\n{tail}")
    print(f"  {log_name}: done in {time.time() - started:.0f} s", flush=True)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _parallel(tasks: list[tuple[list[str], str]], run_root: Path, jobs: int) -> None:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(_launch, task, run_root, name) for task, name in tasks]:
            future.result()


def _variants_arg(variants: list[tuple[str, float]]) -> str:
    return ",".join(f"{method}:{factor:g}" for method, factor in variants)


def _row(pipeline: Any, seed: int, method: str, sft_steps: int | None, factor: float | None, stages: list) -> dict:
    folder = pipeline.stage_dir(stages[-1].name)
    row: dict[str, Any] = {"seed": seed, "method": method, "sft_steps": sft_steps}
    if factor is not None:
        row.update(
            lr_factor=factor,
            learning_rates=[s.config["learning_rate"] for s in stages if "learning_rate" in s.config],
            optimizer_steps=_optimizer_steps(pipeline, stages),
        )
    row.update(json.loads((folder / "eval.json").read_text()))
    return row


def select_factors(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{method: {sft_steps: factor}}: the factor with the best mean validation reward over the tuning rows (ties go
    to the grid's centre, then to the smaller factor)."""
    chosen: dict[str, dict[int, float]] = {}
    keys = {(r["method"], r["sft_steps"]) for r in rows}
    for method, steps in sorted(keys):
        by_factor: dict[float, list[float]] = {}
        for r in rows:
            if r["method"] == method and r["sft_steps"] == steps:
                by_factor.setdefault(r["lr_factor"], []).append(r["validation_reward"])
        best = max(by_factor, key=lambda f: (statistics.fmean(by_factor[f]), f == 1.0, -f))
        chosen.setdefault(method, {})[steps] = best
    return chosen


def family_budgets(family: str) -> tuple[int, ...]:
    return FAMILY_BUDGETS.get(family, SFT_BUDGETS)


def select_divergence(rows: list[dict]) -> dict[str, Any]:
    """The `kd` divergence with the best mean validation reward over the tuning seeds, each at its kept learning
    rate (the quickstart's `kd` student uses it)."""
    kept = [r for r in rows if r.get("tuning") and r.get("selected") and r["method"] in KD_METHODS]
    by_method: dict[str, list[float]] = {}
    for row in kept:
        by_method.setdefault(row["method"], []).append(row["validation_reward"])
    best = max(by_method, key=lambda m: statistics.fmean(by_method[m]))
    return {
        "method": best,
        "loss": KD_METHODS[best],
        "validation_reward": {m: statistics.fmean(v) for m, v in by_method.items()},
    }


def comparisons(rows: list[dict], pairs: tuple[tuple[str, str], ...]) -> list[dict]:
    """Paired test-split differences of each (method, baseline) at each SFT budget, over the selected runs."""
    result = []
    for steps in sorted({r["sft_steps"] for r in rows if r.get("selected")}):
        for method, baseline in pairs:
            values = {}
            for name in (method, baseline):
                values[name] = {
                    metric: {
                        r["seed"]: r[f"test_{metric}"]
                        for r in rows
                        if r["method"] == name and r["sft_steps"] == steps and r.get("selected")
                    }
                    for metric in METRICS
                }
            for metric in METRICS:
                if not values[method][metric] or not values[baseline][metric]:
                    continue
                difference = paired_difference(values[method][metric], values[baseline][metric])
                result.append(
                    {
                        "method": method,
                        "baseline": baseline,
                        "sft_steps": steps,
                        "metric": metric,
                        **difference.as_dict(),
                    }
                )
    return result


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers
    import trl

    import align_distill

    return {
        "align_distill": align_distill.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def reproduce(
    families: list[str],
    seeds: list[int],
    tuning_seeds: int,
    jobs: int,
    run_root: Path,
    quick: bool,
    out: Path,
    command: str,
) -> dict[str, dict]:
    from align_distill.pipeline import Pipeline

    methods = list(dict.fromkeys(m for f in families for m in FAMILIES[f]))
    budgets = {m: {b for f in families if m in FAMILIES[f] for b in family_budgets(f)} for m in methods}
    tuning, reporting = seeds[:tuning_seeds], seeds[tuning_seeds:]
    flags = ["--quick"] if quick else []
    started = time.time()
    print(f"base stages for seeds {seeds}", flush=True)
    _parallel([([str(s), "base", "", *flags], f"seed{s}_base") for s in seeds], run_root, jobs)
    grid = {b: [(m, f) for m in methods if b in budgets[m] for f in LR_FACTORS] for b in SFT_BUDGETS}
    print(f"tuning on seeds {tuning}: {len(grid[SFT_BUDGETS[0]])} variants per seed at the first budget", flush=True)
    # budget-major: one seed's two budgets rarely run at once
    tasks = [([str(s), str(b), _variants_arg(grid[b]), *flags], f"seed{s}_sft{b}_grid") for b in grid for s in tuning]
    _parallel([task for task in tasks if task[0][2]], run_root, jobs)

    rows: list[dict] = []
    for seed in tuning:
        pipeline = Pipeline(run_root / f"seed{seed}", [])
        for steps, variants in grid.items():
            for method, factor in variants:
                stages = variant_stages(method, seed, steps, factor)
                rows.append({**_row(pipeline, seed, method, steps, factor, stages), "tuning": True})
    chosen = select_factors(rows)
    for row in rows:
        row["selected"] = chosen[row["method"]][row["sft_steps"]] == row["lr_factor"]
    print(f"chosen learning-rate factors: {chosen}", flush=True)

    kept = {b: [(m, chosen[m][b]) for m in methods if b in budgets[m]] for b in SFT_BUDGETS}
    tasks = [([str(s), str(b), _variants_arg(kept[b]), *flags], f"seed{s}_sft{b}") for b in kept for s in reporting]
    _parallel([task for task in tasks if task[0][2]], run_root, jobs)
    for seed in reporting:
        pipeline = Pipeline(run_root / f"seed{seed}", [])
        for steps, variants in kept.items():
            for method, factor in variants:
                stages = variant_stages(method, seed, steps, factor)
                rows.append({**_row(pipeline, seed, method, steps, factor, stages), "tuning": False, "selected": True})
    for seed in seeds:
        pipeline = Pipeline(run_root / f"seed{seed}", [])
        for name in BASE_MODELS:
            rows.append({**_row(pipeline, seed, name, None, None, [_named(name)]), "base": True})
        for steps in SFT_BUDGETS:
            rows.append(
                {**_row(pipeline, seed, "student_sft", steps, None, [_named(student_stage(steps))]), "base": True}
            )

    wall = time.time() - started
    written = {}
    for family in families:
        family_rows = [
            r
            for r in rows
            if (r.get("base") or r["method"] in FAMILIES[family])
            and (r["sft_steps"] is None or r["sft_steps"] in family_budgets(family))
        ]
        record = {
            "family": family,
            "command": command,
            "quick": quick,
            "protocol": {
                "seeds": seeds,
                "tuning_seeds": tuning,
                "lr_factors": list(LR_FACTORS),
                "sft_budgets": list(family_budgets(family)),
                "selection": "best mean validation reward over the tuning seeds, per method and SFT budget",
                "report_split": "test",
                "evaluation_prompts": QUICK_EVAL if quick else _eval_sizes(),
                "bootstrap_resamples": 10_000,
            },
            "selected_lr_factors": {
                m: {str(k): v for k, v in chosen[m].items() if k in family_budgets(family)} for m in FAMILIES[family]
            },
            "configs": {
                m: [_stage_dict(s) for s in variant_stages(m, 0, SFT_BUDGETS[0], 1.0)] for m in FAMILIES[family]
            },
            "base_configs": [_stage_dict(s) for s in base_stages(0)],
            "versions": versions(),
            "wall_s": round(wall),
            "runs": family_rows,
            "comparisons": comparisons(family_rows, COMPARISONS[family]),
        }
        if family == "kd":
            record["selected_divergence"] = select_divergence(family_rows)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{family}.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record, indent=1) + "\n")
        temporary.replace(path)
        written[family] = record
        print(f"wrote {path}", flush=True)
    return written


def _named(name: str) -> Any:
    from align_distill.pipeline import Stage

    return Stage(name, "call", "", {})


def _stage_dict(stage: Any) -> dict:
    return {"name": stage.name, "kind": stage.kind, "target": stage.target, "config": stage.config}


def _eval_sizes() -> dict[str, int]:
    from align_distill.synthetic import EVAL_SIZES

    return dict(EVAL_SIZES)


def reproduce_quickstart(run_root: Path, out: Path, command: str, quick: bool) -> dict:
    """The quickstart as a new user runs it (seed 0, every method), its test-split table kept as JSON."""
    from align_distill.quickstart import run_quickstart
    from align_distill.quickstart.stages import STUDENT_STEPS

    started = time.time()
    results = run_quickstart(run_root / "quickstart", seed=0, smoke=quick)
    record = {
        "family": "quickstart",
        "command": command,
        "quick": quick,
        "seed": 0,
        "split": "test",
        "student_steps": STUDENT_STEPS,
        "versions": versions(),
        "wall_s": round(time.time() - started),
        "runs": [
            {"seed": 0, "method": name, **{f"test_{k}": v for k, v in metrics.items()}}
            for name, metrics in results.items()
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"all, quickstart or any of {', '.join(FAMILIES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {list(SEEDS)} (quick: 0 1)")
    parser.add_argument(
        "--tuning-seeds",
        type=int,
        default=None,
        help=f"first seeds that run the whole grid (default {TUNING_SEEDS}; quick 1)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes in parallel (one torch thread each)")
    parser.add_argument("--run-root", default=None, help="default runs/reproduce (quick: runs/reproduce_quick)")
    parser.add_argument("--out", default=None, help="default bench/reproductions (quick: <run-root>/json)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and 2 seeds: the wiring, not evidence")
    parser.add_argument("--worker", nargs=3, metavar=("SEED", "SFT_STEPS", "VARIANTS"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    options = _parser().parse_args(argv)
    run_root = Path(options.run_root or ("runs/reproduce_quick" if options.quick else "runs/reproduce"))
    if options.worker:
        seed, steps, variants = options.worker
        parsed = [(v.split(":")[0], float(v.split(":")[1])) for v in variants.split(",") if v]
        run_worker(int(seed), None if steps == "base" else int(steps), parsed, run_root, options.quick)
        return
    names = options.families or ["all"]
    if "all" in names:
        names = [*FAMILIES, "quickstart"]
    unknown = [n for n in names if n not in FAMILIES and n != "quickstart"]
    if unknown:
        raise SystemExit(f"bench.reproduce: unknown {unknown}; choose from all, quickstart, {', '.join(FAMILIES)}")
    seeds = options.seeds or ([0, 1] if options.quick else list(SEEDS))
    tuning = options.tuning_seeds if options.tuning_seeds is not None else (1 if options.quick else TUNING_SEEDS)
    out = Path(options.out or (run_root / "json" if options.quick else OUT))
    command = "python -m bench.reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    families = [n for n in names if n in FAMILIES]
    if families:
        reproduce(families, seeds, tuning, options.jobs, run_root, options.quick, out, command)
    if "quickstart" in names:
        reproduce_quickstart(run_root, out, command, options.quick)


if __name__ == "__main__":
    main()
