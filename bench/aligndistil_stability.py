"""How sensitive is off-policy AlignDistil on the quickstart's synthetic task to float noise?

A one-seed quickstart run is "deterministic on CPU" on one machine only: another machine sums floats in another
order, and a method that amplifies that noise lands elsewhere. This bench mimics such a machine: per task seed it
builds the quickstart's base stages once (`quickstart.base_stages`, cached under `<run_root>/seed<k>`), then trains
the quickstart's `aligndistil_off` stage from the same SFT student K times, each with one perturbation:

- `none`: the stage exactly as the quickstart runs it (the reference run of the seed);
- `noise:<s>`: N(0, `--noise-std`²) (default 1e-7, about the float32 rounding of these weights) added to every
  student weight before the first step, drawn with generator seed `s`;
- `threads:<n>`: `torch.set_num_threads(n)` during training (another summation order in the kernels).

Everything else (data order, dropout, the training seed) is the stage's own, so runs differ only by the perturbation.
Per optimizer step it records the trainer's own metrics (loss, grad_norm, learning_rate,
`aligndistil/alpha_at_*`; its `aligndistil/alpha|beta|kl` equal `alpha_mean|beta_mean|kl_mean` below) and
diagnostics that the trainer does not log, computed on the very batch of the step (`batch_diagnostics`): α_t and β_t
statistics (mean, max, share of tokens whose β_t ≥ 10, i.e. α_t ≤ 0.01), the extrapolated teacher's logits (max
logit, mean and max logit range max_v − min_v, entropy), the student's entropy, the β_t-weighted KL and the share of
the loss that sits on the style-marker token (the first response token, the only one where the preference lives); a
probe of the student's polite-marker probability on the validation prompts (`marker_probe`); and the distance of
the weights to the seed's reference run (`param_dist`). Each final model is scored on the validation split (200
prompts). No library code is changed: the diagnostics come from a subclass of the trainer
(`instrumented_trainer_class`) whose extra forwards run under no_grad after the parent's loss.

`--base-perturbations noise:<s> ...` also rebuilds the base stages of `--base-seeds` (default: the first seed) from
initial weights perturbed the same way and trains the unperturbed stage on each: whether the *teachers* an
AlignDistil run gets are what another machine changes.

`--variant NAME:key=value,...` adds AlignDistil config overrides to test a candidate fix with the same
perturbations (e.g. `--variant eps0.1:eps=0.1`; `--variant-perturbations` limits them); `default`, the quickstart's
config unchanged, always runs. Each run is cached in its folder (`stability_run.json`, keyed by config and
perturbation), so a rerun only re-evaluates the base models.

The committed JSON (docs/methods/aligndistil.md §11): about 15 minutes on one CPU thread, 10-20 s per AlignDistil run,
about 1.5-3 minutes per base pipeline, a `threads:2` run much longer on a busy machine:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m bench.aligndistil_stability --seeds 0 1 \
        --perturbations none noise:1 noise:2 noise:3 threads:2 \
        --variant eps0.1:eps=0.1 --variant uniform:variant=contrastive,ratio=1 \
        --variant-perturbations none noise:1 --base-perturbations noise:1 noise:2

Writes `--out` (default `bench/reproductions/aligndistil_stability.json`) and prints a summary table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OUT = Path("bench/reproductions/aligndistil_stability.json")
RUN_ROOT = Path("runs/aligndistil_stability")
DEFAULT_PERTURBATIONS = ("none", "noise:1", "noise:2", "noise:3", "noise:4", "noise:5", "noise:6", "noise:7")
NOISE_STD = 1e-7
# A run "ends well" when its validation preference rate reaches this (the SFT student sits near 0.5).
GOOD_PREFERENCE = 0.8
# Quantities whose first divergence between runs is reported (trajectory keys), in display order.
DIVERGENCE_KEYS = (
    "alpha_mean",
    "beta_mean",
    "teacher_max_logit",
    "loss",
    "grad_norm",
    "kl_mean",
    "student_entropy",
    "marker_loss_share",
    "probe_p_polite",
    "probe_polite_rate",
)


# ---- pure parts (tested in tests/bench/test_aligndistil_stability.py) ----------------------------------------------


def parse_perturbation(text: str, noise_std: float = NOISE_STD) -> dict[str, Any]:
    """`none`, `noise:<seed>` or `threads:<n>` → `{"kind", ...}` (see the module docstring)."""
    kind, _, value = text.partition(":")
    if kind == "none" and not value:
        return {"kind": "none"}
    if kind == "noise" and value.isdigit():
        return {"kind": "noise", "seed": int(value), "std": noise_std}
    if kind == "threads" and value.isdigit() and int(value) >= 1:
        return {"kind": "threads", "threads": int(value)}
    raise ValueError(f"perturbation must be none, noise:<seed> or threads:<n>, found {text!r}")


def perturb_(model: Any, std: float, seed: int) -> int:
    """Add N(0, std²) to every floating-point parameter of `model` in place, drawn on the CPU from a generator
    seeded with `seed` (the same noise whatever the device); returns how many numbers changed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for param in model.parameters():
            if not param.is_floating_point():
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            param.add_(noise.to(param.device, param.dtype))
            count += param.numel()
    return count


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME:key=value,key=value` → (NAME, overrides) with JSON-parsed values (`default` alone: no overrides)."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"variant needs a name, found {text!r}")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"variant override must be key=value, found {item!r} in {text!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def batch_diagnostics(
    student_logits: Any,
    dpo_logits: Any,
    rev_logits: Any,
    mask: Any,
    marker: Any,
    beta0: float,
    tvd_scale: float,
    eps: float,
    tvd_half: bool = False,
) -> dict[str, float]:
    """AlignDistil-internal quantities of one batch, over the scored rows (`mask [B, T]`; logits `[B, T, V]`).

    `marker [B, T]` marks the row that predicts each response's first token (the style marker). Uses the loss's own
    teacher (`aligndistil_teacher`, the adaptive variant) so α_t and π* are exactly the trained ones; the raw
    extrapolated logits z* = z_dpo + α_t·(z_dpo − z_rev) are rebuilt for their scale.
    """
    import torch

    from align_distill.losses import aligndistil_teacher

    with torch.no_grad():
        mask = mask.bool()
        marker = marker.bool() & mask
        student, dpo, rev = (x.float() for x in (student_logits, dpo_logits, rev_logits))
        teacher_logprobs, alpha = aligndistil_teacher(dpo, rev, tvd_scale, eps, tvd_half)
        z_star = dpo + alpha.unsqueeze(-1) * (dpo - rev)
        beta = beta0 / alpha
        log_student = student.log_softmax(-1)
        p_student = log_student.exp()
        kl = (p_student * (log_student - teacher_logprobs)).sum(-1)
        weighted = beta * kl
        teacher_entropy = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1)
        student_entropy = -(p_student * log_student).sum(-1)
        logit_range = z_star.amax(-1) - z_star.amin(-1)

        def mean(x: torch.Tensor, where: torch.Tensor = mask) -> float:
            return float(x[where].mean()) if where.any() else float("nan")

        def top(x: torch.Tensor) -> float:
            return float(x[mask].max()) if mask.any() else float("nan")

        total = weighted[mask].sum()
        return {
            "alpha_mean": mean(alpha),
            "alpha_max": top(alpha),
            "beta_mean": mean(beta),
            "beta_max": top(beta),
            "beta_ge_10_share": mean((beta >= 10).float()),
            "teacher_max_logit": top(z_star.amax(-1)),
            "teacher_logit_range_mean": mean(logit_range),
            "teacher_logit_range_max": top(logit_range),
            "teacher_entropy_mean": mean(teacher_entropy),
            "student_entropy": mean(student_entropy),
            "kl_mean": mean(kl),
            "kl_max": top(kl),
            "weighted_kl_mean": mean(weighted),
            "weighted_kl_max": top(weighted),
            "marker_alpha": mean(alpha, marker),
            "marker_beta": mean(beta, marker),
            "marker_kl": mean(kl, marker),
            "marker_loss_share": float(weighted[marker].sum() / total) if total > 0 else float("nan"),
        }


def first_divergence(trajectories: Sequence[Sequence[dict]], key: str, rel_tol: float = 0.01) -> int | None:
    """First step at which runs that share their steps disagree on `key` by more than `rel_tol` relative to the
    values' mean magnitude: (max − min) > rel_tol·mean|x| (+1e-12); None if they never do (or `key` is missing)."""
    by_step: dict[int, list[float]] = {}
    for trajectory in trajectories:
        for point in trajectory:
            value = point.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                by_step.setdefault(int(point["step"]), []).append(float(value))
    for step in sorted(by_step):
        values = by_step[step]
        if len(values) < len(trajectories) or len(values) < 2:
            continue
        scale = statistics.fmean(abs(v) for v in values)
        if max(values) - min(values) > rel_tol * scale + 1e-12:
            return step
    return None


def summarize_trajectory(trajectory: Sequence[dict]) -> dict[str, Any]:
    """One run's trajectory in a few numbers: final loss, grad_norm max (and its step), the largest α/β/teacher
    logit seen, the last probe of the polite marker."""
    summary: dict[str, Any] = {"steps": len(trajectory)}
    if not trajectory:
        return summary
    last = trajectory[-1]
    summary["final_loss"] = last.get("loss")
    norms = [(p["grad_norm"], p["step"]) for p in trajectory if p.get("grad_norm") is not None]
    if norms:
        peak, at = max(norms)
        summary.update(grad_norm_max=peak, grad_norm_max_step=at, grad_norm_mean=statistics.fmean(n for n, _ in norms))
    for key in ("alpha_max", "beta_max", "teacher_max_logit", "teacher_logit_range_max", "weighted_kl_max"):
        values = [p[key] for p in trajectory if p.get(key) is not None]
        if values:
            summary[f"{key}_peak"] = max(values)
    for key in ("probe_p_polite", "probe_polite_rate", "param_dist"):
        if last.get(key) is not None:
            summary[f"final_{key}"] = last[key]
    return summary


def rounded(point: dict[str, Any], digits: int = 6) -> dict[str, Any]:
    """`point` with its floats rounded to `digits` significant digits (the JSON stays readable)."""
    return {k: float(f"{v:.{digits}g}") if isinstance(v, float) else v for k, v in point.items()}


def outcome_stats(values: Sequence[float]) -> dict[str, float]:
    """mean, sd (sample; 0 for one value), min, max of a list of outcomes."""
    values = list(values)
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


# Trajectory quantities averaged over the steps (and runs) of a group, and those whose peak is reported.
MEAN_KEYS = (
    "alpha_mean",
    "beta_mean",
    "beta_ge_10_share",
    "marker_alpha",
    "marker_beta",
    "marker_loss_share",
    "teacher_entropy_mean",
    "student_entropy",
    "kl_mean",
    "marker_kl",
    "loss",
    "grad_norm",
)
PEAK_KEYS = ("alpha_max", "beta_max", "teacher_max_logit", "teacher_logit_range_max", "kl_max", "grad_norm")


def trajectory_stats(trajectories: Sequence[Sequence[dict]], max_grad_norm: float = 1.0) -> dict[str, Any]:
    """What a group of runs went through: the mean over all their steps of `MEAN_KEYS`, the peak of `PEAK_KEYS`,
    the share of steps whose gradient was clipped (grad_norm > `max_grad_norm`, TRL's default 1.0), the polite-marker
    probe at the start and the end (means over runs), and the range of the weights' distance to the reference run."""

    def values(key: str) -> list[float]:
        return [float(p[key]) for t in trajectories for p in t if p.get(key) is not None and not math.isnan(p[key])]

    stats: dict[str, Any] = {}
    for key in MEAN_KEYS:
        if found := values(key):
            stats[f"{key}_mean"] = statistics.fmean(found)
    for key in PEAK_KEYS:
        if found := values(key):
            stats[f"{key}_peak"] = max(found)
    if norms := values("grad_norm"):
        stats["grad_norm_min"] = min(norms)
        stats["clipped_step_share"] = sum(n > max_grad_norm for n in norms) / len(norms)
    for name, index in (("start", 0), ("end", -1)):
        for key in ("probe_p_polite", "probe_polite_rate"):
            found = [float(t[index][key]) for t in trajectories if t and t[index].get(key) is not None]
            if found:
                stats[f"{key}_{name}"] = statistics.fmean(found)
    if dists := values("param_dist"):
        stats["param_dist_min"], stats["param_dist_max"] = min(dists), max(dists)
    return stats


def analyse(runs: Sequence[dict], good: float = GOOD_PREFERENCE, rel_tol: float = 0.01) -> dict[str, Any]:
    """Per (variant, seed, scope): the distribution of the final outcomes, how many runs end well (validation
    preference ≥ `good`), and for each of `DIVERGENCE_KEYS` the first step at which the runs disagree by `rel_tol`.
    Scope `stage`: the runs on the seed's quickstart base (perturbed AlignDistil stage); `pipeline`: the unperturbed
    stage on the quickstart base and on every perturbed base (when some base was perturbed)."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for run in runs:
        variant, seed = run.get("variant", "default"), int(run["seed"])
        reference_base = run.get("base", "reference") == "reference"
        if reference_base:
            groups.setdefault((variant, seed, "stage"), []).append(run)
        if run["perturbation"]["name"] == "none":
            groups.setdefault((variant, seed, "pipeline"), []).append(run)
    result = {}
    for (variant, seed, scope), members in sorted(groups.items()):
        if scope == "pipeline" and len(members) < 2:
            continue  # no base was perturbed for this seed
        trajectories = [m["trajectory"] for m in members]
        result[f"{variant}/seed{seed}/{scope}"] = {
            "variant": variant,
            "seed": seed,
            "scope": scope,
            "runs": len(members),
            **{k: outcome_stats([m["final"][k] for m in members]) for k in ("reward", "capability", "preference")},
            "ends_well": sum(m["final"]["preference"] >= good for m in members),
            "first_divergence_step": {k: first_divergence(trajectories, k, rel_tol) for k in DIVERGENCE_KEYS},
            "trajectory_stats": trajectory_stats(trajectories),
        }
    return result


# ---- training ------------------------------------------------------------------------------------------------------


def prepare(run_dir: Path, seed: int, base_perturbation: dict[str, Any] | None = None) -> Any:
    """The quickstart's base stages (models, data, teacher SFT → DPO / reverse DPO, student SFT), cached.

    With a `noise` `base_perturbation`, the freshly built random initial teacher and student are perturbed on disk
    (`perturb_`, seed +0 for the teacher and +1 for the student) before any training stage runs: the whole
    teacher/student preparation then starts from weights a rounding error away from the quickstart's."""
    from align_distill.models import load_model
    from align_distill.pipeline import Pipeline
    from align_distill.quickstart import base_stages

    stages = base_stages(seed)
    if base_perturbation is not None and base_perturbation["kind"] != "none":
        if base_perturbation["kind"] != "noise":
            raise ValueError(f"base perturbations are noise:<seed> only, found {base_perturbation}")
        pipeline = Pipeline(run_dir, stages[:2])  # models and data
        marker = run_dir / "models" / "perturbed.json"
        if not marker.is_file():
            pipeline.run()
            for offset, name in enumerate(("teacher", "student")):
                folder = run_dir / "models" / name
                model = load_model(folder, dtype="float32")
                perturb_(model, base_perturbation["std"], base_perturbation["seed"] + offset)
                model.save_pretrained(folder)
            marker.write_text(json.dumps(base_perturbation))
    pipeline = Pipeline(run_dir, stages)
    pipeline.run()
    return pipeline


def stage_config(pipeline: Any, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The quickstart's `aligndistil_off` stage config for `seed`, resolved against `pipeline`, plus overrides."""
    from align_distill.quickstart.stages import aligndistil_off_student

    (stage,) = aligndistil_off_student(seed)
    return {**pipeline.resolve(stage), **overrides}


def marker_ids(tokenizer: Any) -> tuple[int, int]:
    """Token ids of the polite and the blunt style marker as the first response token."""
    from align_distill.synthetic.task import BLUNT, POLITE

    ids = []
    for marker in (POLITE, BLUNT):
        tokens = tokenizer(f"{marker} a b c", add_special_tokens=False)["input_ids"]
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise ValueError(f"the style markers share their first token {ids[0]}")
    return ids[0], ids[1]


def marker_probe(model: Any, tokenizer: Any, prompt_ids: list[list[int]], polite: int, blunt: int) -> dict[str, float]:
    """The student's next-token distribution after each validation prompt (chat template, generation prompt):
    mean P(polite marker) and the share of prompts where the polite marker beats the blunt one (≈ the greedy
    preference rate when the response starts with a marker)."""
    import torch

    was_training = model.training
    model.eval()
    length = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompt_ids], device=model.device)
    attention = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompt_ids], device=model.device)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=1, use_cache=False).logits[:, -1]
    finally:
        model.train(was_training)
    probs = logits.float().softmax(-1)
    return {
        "probe_p_polite": float(probs[:, polite].mean()),
        "probe_polite_rate": float((probs[:, polite] > probs[:, blunt]).float().mean()),
    }


def instrumented_trainer_class() -> type:
    """`AlignDistilTrainer` that also records `batch_diagnostics` of each training batch (extra no-grad forwards of
    the three models; the loss and its gradient are the parent's, untouched)."""
    import torch

    from align_distill.trainers.aligndistil import AlignDistilTrainer, kept_positions, scored_rows

    class InstrumentedAlignDistilTrainer(AlignDistilTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training and "prompts" not in inputs:
                self._diagnose(model, inputs)
            return out

        def _diagnose(self, model: Any, batch: dict) -> None:
            args = self.args
            if args.variant != "adaptive" or args.official_alignment:
                return
            completion = batch["completion_mask"].bool() if "completion_mask" in batch else batch["labels"] != -100
            completion = completion & batch["attention_mask"].bool()
            rows = scored_rows(completion, False)
            keep = kept_positions(rows)
            first = completion.float().argmax(-1)  # first response token; row first-1 predicts it
            marker = torch.zeros_like(rows)
            has = completion.any(-1)
            marker[has.nonzero().flatten(), (first[has] - 1).clamp(min=0)] = True
            with torch.no_grad():
                logits = [
                    m(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        logits_to_keep=keep,
                        use_cache=False,
                    ).logits[..., : self.vocab_size]
                    for m in (model, self.dpo_model, self.rev_dpo_model)
                ]
            stats = batch_diagnostics(
                *logits, rows[:, keep], marker[:, keep], args.beta, args.tvd_scale, args.eps, args.tvd_half
            )
            for key, value in stats.items():
                self._metrics["train"][f"diag/{key}"].append(value)

    return InstrumentedAlignDistilTrainer


def train_run(
    config: dict[str, Any],
    output_dir: Path,
    perturbation: dict[str, Any],
    probe: tuple[list[list[int]], int, int],
    reference: list[Any] | None,
) -> tuple[list[dict], list[Any]]:
    """Train AlignDistil with `config` and `perturbation`; the per-step trajectory and the per-step flat weights
    (kept only for the reference run, to measure the other runs' distance from it)."""
    import torch
    from transformers import HfArgumentParser, TrainerCallback

    from align_distill.methods import aligndistil as method
    from align_distill.methods.common import load_method_dataset, train_student, training_callbacks
    from align_distill.models import load_tokenizer

    data_args, training_args, model_args = HfArgumentParser(method.DATACLASSES).parse_dict(
        # logging every step changes what is logged, not what is trained
        {**config, "output_dir": str(output_dir), "logging_steps": 1, "disable_tqdm": True},
        allow_extra_keys=False,
    )
    points: dict[int, dict[str, Any]] = {}
    snapshots: list[Any] = []
    keep_snapshots = reference is None

    def flat(model: Any) -> Any:
        return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if perturbation["kind"] == "noise":
                perturb_(model, perturbation["std"], perturbation["seed"])
            self._observe(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self._observe(model, state.global_step)

        def _observe(self, model, step):
            point = points.setdefault(step, {"step": step})
            point.update(marker_probe(model, probe_tokenizer, *probe))
            weights = flat(model)
            if keep_snapshots:
                snapshots.append(weights)
            elif step < len(reference):
                point["param_dist"] = float((weights - reference[step]).norm())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            point = points.setdefault(state.global_step, {"step": state.global_step})
            for key, value in logs.items():
                if key in ("learning_rate", "loss", "grad_norm") or key.startswith("aligndistil/alpha_at_"):
                    point[key.removeprefix("aligndistil/")] = value
                elif key.startswith("diag/"):
                    point[key.removeprefix("diag/")] = value

    probe_tokenizer = load_tokenizer(model_args.model_name_or_path)
    train, _ = load_method_dataset(
        data_args, method.DATA_FORMAT, probe_tokenizer, training_args.max_length, ("prompt", "chosen")
    )
    threads = torch.get_num_threads()
    if perturbation["kind"] == "threads":
        torch.set_num_threads(perturbation["threads"])
    try:
        with training_callbacks([Recorder()]):
            train_student(instrumented_trainer_class(), model_args, training_args, probe_tokenizer, train)
    finally:
        torch.set_num_threads(threads)
    return [rounded(points[s]) for s in sorted(points)], snapshots


def evaluate_folder(folder: Path, seed: int, split: str = "validation") -> dict[str, float]:
    from align_distill.models import load_model, load_tokenizer
    from align_distill.synthetic import evaluate

    result = evaluate(load_model(folder, dtype="float32"), load_tokenizer(folder), seed=seed, split=split).as_dict()
    return {k: result[k] for k in ("reward", "capability", "preference")}


BASE_MODELS = ("teacher_sft", "teacher_dpo", "teacher_rev_dpo", "student_sft")


def max_abs_diff(folder: Path, other: Path) -> float:
    """Largest absolute difference between the weights saved in two model folders (same architecture)."""
    from safetensors.torch import load_file

    a, b = load_file(str(folder / "model.safetensors")), load_file(str(other / "model.safetensors"))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def weights_digest(folder: Path) -> str:
    """sha256 of a model folder's `model.safetensors` (a cached run is reused only on the very same models)."""
    import hashlib

    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def to_json(record: dict[str, Any], digits: int = 5) -> str:
    """`record` as indented JSON with each trajectory point on one line, its floats to `digits` significant digits
    (the file stays short and diffable; the analysis was computed before, from 6-digit points)."""
    points: list[str] = []

    def placeholder(point: dict) -> str:
        points.append(json.dumps(rounded(point, digits)))
        return f"@@point{len(points) - 1}@@"

    runs = [{**r, "trajectory": [placeholder(p) for p in r["trajectory"]]} for r in record.get("runs", [])]
    text = json.dumps({**record, "runs": runs}, indent=1)
    return re.sub(r'"@@point(\d+)@@"', lambda m: points[int(m.group(1))], text) + "\n"


def versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as recorded: run-specific absolute paths replaced by the stage placeholders."""
    names = {"model_name_or_path": "${student_sft}", "teacher_model_name_or_path": "${teacher_dpo}"}
    names |= {"reference_model_name_or_path": "${teacher_rev_dpo}", "dataset_name": "${data}/pairs.jsonl"}
    return {k: names.get(k, v) for k, v in config.items()}


def _run_cached(
    folder: Path, key: dict[str, Any], seed: int, train: Any
) -> tuple[dict[str, Any], list[dict], list[Any]]:
    """Train (`train()` → trajectory, weight snapshots) and evaluate into `folder`, or reuse what a run with the same
    `key` (config, perturbation, digests of the base models) left there (`stability_run.json`, and `snapshots.pt`
    for a reference run)."""
    import torch

    record_path, snapshot_path = folder / "stability_run.json", folder / "snapshots.pt"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            snapshots = list(torch.load(snapshot_path)) if snapshot_path.is_file() else []
            return record["final"], record["trajectory"], snapshots
    trajectory, snapshots = train()
    final = evaluate_folder(folder, seed)
    if snapshots:
        torch.save(torch.stack(snapshots), snapshot_path)
    record_path.write_text(json.dumps({"key": key, "final": final, "trajectory": trajectory}))
    return final, trajectory, snapshots


def run(
    seeds: Sequence[int],
    perturbations: Sequence[str],
    variants: Sequence[str],
    run_root: Path,
    noise_std: float,
    variant_perturbations: Sequence[str] | None = None,
    base_perturbations: Sequence[str] = (),
    base_seeds: Sequence[int] = (),
) -> dict[str, Any]:
    """Every (seed, variant, perturbation) run from the seed's quickstart base (`default` variant: all
    `perturbations`; the others: `variant_perturbations`, default the same), then for each of `base_seeds` every
    variant, unperturbed, on each base rebuilt under one of `base_perturbations`."""
    from align_distill.data.tokens import encode_prompt
    from align_distill.models import load_tokenizer
    from align_distill.synthetic import evaluation_prompts

    parsed_variants = dict(parse_variant(v) for v in variants)
    runs: list[dict] = []
    bases: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    jobs = [(seed, "reference") for seed in seeds] + [(s, b) for s in base_seeds for b in base_perturbations]
    for seed, base in jobs:
        reference_base = base == "reference"
        base_perturbation = None if reference_base else parse_perturbation(base, noise_std)
        base_dir = run_root / (f"seed{seed}" if reference_base else f"seed{seed}_base_{base.replace(':', '_')}")
        pipeline = prepare(base_dir, seed, base_perturbation)
        sft = pipeline.stage_dir("student_sft")
        base_record = {name: evaluate_folder(pipeline.stage_dir(name), seed) for name in BASE_MODELS}
        if not reference_base:  # how far the rounding-error start moved each model from the seed's quickstart one
            base_record["max_abs_weight_diff_vs_reference"] = {
                name: max_abs_diff(pipeline.stage_dir(name), run_root / f"seed{seed}" / name) for name in BASE_MODELS
            }
        bases[f"{seed}" if reference_base else f"{seed}/base {base}"] = base_record
        tokenizer = load_tokenizer(sft)
        prompt_ids = [
            encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in evaluation_prompts("validation", seed)
        ]
        probe = (prompt_ids, *marker_ids(tokenizer))
        models = {name: weights_digest(pipeline.stage_dir(name)) for name in BASE_MODELS}  # keys the run cache
        for variant, overrides in parsed_variants.items():
            config = stage_config(pipeline, seed, overrides)
            configs[variant] = public_config(config)
            if not reference_base:
                texts: Sequence[str] = ["none"]
            elif variant == "default" or variant_perturbations is None:
                texts = perturbations
            else:
                texts = variant_perturbations
            reference = None
            for text in texts:
                perturbation = parse_perturbation(text, noise_std)
                out_dir = base_dir / "stability" / variant / text.replace(":", "_")
                t0 = time.time()
                key = {"config": public_config(config), "perturbation": perturbation, "models": models, "version": 1}
                train = functools.partial(train_run, config, out_dir, perturbation, probe, reference)
                final, trajectory, snapshots = _run_cached(out_dir, key, seed, train)
                if reference is None:  # the first run of the list is the reference
                    reference = snapshots
                runs.append(
                    {
                        "seed": seed,
                        "base": base,
                        "variant": variant,
                        "perturbation": {"name": text, **perturbation},
                        "final": final,
                        "summary": {**summarize_trajectory(trajectory), **trajectory_stats([trajectory])},
                        "trajectory": trajectory,
                    }
                )
                print(f"seed {seed} base {base} {variant} {text}: {final} ({time.time() - t0:.0f}s)", flush=True)
    return {
        "versions": versions(),
        "perturbation_method": (
            f"noise:<s> adds N(0, {noise_std:g}^2) to every student weight before AlignDistil's first step "
            "(torch.Generator seed s); threads:<n> trains under torch.set_num_threads(n) instead of 1; none is the "
            "quickstart stage as is. Base perturbation noise:<s>: the same noise added to the random initial teacher "
            "(seed s) and student (seed s+1) before the whole base pipeline (teacher SFT, DPO, reverse DPO, student "
            "SFT) is rebuilt; AlignDistil then runs unperturbed on it."
        ),
        "config": configs.get("default", next(iter(configs.values()), {})),
        "variants": {name: {"overrides": o, "config": configs.get(name)} for name, o in parsed_variants.items()},
        "bases": bases,
        "eval": {"split": "validation", "n": 200, "decoding": "greedy"},
        "good_preference": GOOD_PREFERENCE,
        "analysis": analyse(runs),
        "runs": runs,
    }


def print_table(record: dict[str, Any]) -> None:
    print(f"\n{'variant/seed':<22}{'runs':>5}{'ends well':>10}{'preference mean±sd [min, max]':>34}{'reward':>16}")
    for key, row in record["analysis"].items():
        p, r = row["preference"], row["reward"]
        pref = f"{p['mean']:.3f}±{p['sd']:.3f} [{p['min']:.3f}, {p['max']:.3f}]"
        print(f"{key:<22}{row['runs']:>5}{row['ends_well']:>10}{pref:>34}{r['mean']:>10.3f}±{r['sd']:.3f}")
        print(f"    first divergence step: {row['first_divergence_step']}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--perturbations", nargs="+", default=list(DEFAULT_PERTURBATIONS))
    p.add_argument("--variant", dest="variants", action="append", default=None, help="NAME:key=value,... (repeat)")
    p.add_argument("--variant-perturbations", nargs="+", default=None, help="perturbations of non-default variants")
    p.add_argument("--base-perturbations", nargs="+", default=[], help="noise:<s>: rebuild the base perturbed")
    p.add_argument("--base-seeds", type=int, nargs="+", default=None, help="seeds whose base is perturbed (first)")
    p.add_argument("--noise-std", type=float, default=NOISE_STD)
    p.add_argument("--run-root", type=Path, default=RUN_ROOT)
    p.add_argument("--out", type=Path, default=OUT)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = _parser().parse_args(argv)
    for text in [*opts.perturbations, *(opts.variant_perturbations or []), *opts.base_perturbations]:
        parse_perturbation(text)  # fail before any training
    variants = opts.variants or ["default"]
    if "default" not in {parse_variant(v)[0] for v in variants}:
        variants = ["default", *variants]
    base_seeds = opts.seeds[:1] if opts.base_seeds is None else opts.base_seeds
    if not set(base_seeds) <= set(opts.seeds):
        raise SystemExit(f"--base-seeds {base_seeds} must be among --seeds {opts.seeds} (their reference base)")
    record = run(
        opts.seeds,
        opts.perturbations,
        variants,
        opts.run_root,
        opts.noise_std,
        opts.variant_perturbations,
        opts.base_perturbations if base_seeds else [],
        base_seeds if opts.base_perturbations else [],
    )
    command = "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m bench.aligndistil_stability " + shlex.join(argv)
    record = {"command": command.strip(), **record}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(to_json(record))
    print_table(record)
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
