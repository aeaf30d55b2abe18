"""Reward-vs-steps curves: the synthetic task's ground-truth reward measured while a method trains.

Final rewards say which method ends higher; curves say how fast each gets there (AlignDistil's convergence claim,
docs/methods/aligndistil.md §6.5). `reward_curves` is a pipeline `call` stage: it trains each given method config again
from its own starting model with a `RewardCurve` callback (same config and seed as the method's own stage), and
writes `curves.json` and `reward_vs_steps.png`. The quickstart adds it for DPO vs AlignDistil.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from transformers import HfArgumentParser, TrainerCallback

from align_distill.methods import method_module
from align_distill.methods.common import training_callbacks
from align_distill.synthetic.evaluate import evaluate

Curve = list[dict[str, float]]  # [{"step", "reward", "capability", "preference"}, ...]


def reward_curve_callback(points: Curve, every: int, n: int | None, seed: int = 0) -> Any:
    """A `TrainerCallback` appending the greedy ground-truth reward to `points` at step 0, every `every` optimizer
    steps and at the last step (on the first `n` prompts of `seed`'s test split)."""

    if every < 1:
        raise ValueError(f"reward curve: `every` must be >= 1 optimizer step, found {every}")

    def measure(model: Any, tokenizer: Any, step: int) -> None:
        if points and points[-1]["step"] == step:
            return
        was_training = model.training
        result = evaluate(model, tokenizer, n=n, seed=seed).as_dict()
        model.train(was_training)
        points.append({"step": step, **{k: result[k] for k in ("reward", "capability", "preference")}})

    class RewardCurve(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
            measure(model, processing_class, 0)

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                measure(model, processing_class, state.global_step)

    return RewardCurve()


def train_with_curve(method: str, config: dict[str, Any], output_dir: Path, every: int, n: int | None) -> Curve:
    """Train `method` (registry name: dpo, aligndistil, ...) with `config` as its stage would; the measured curve."""

    module = method_module(method)
    parsed = HfArgumentParser(module.DATACLASSES).parse_dict(
        {**config, "output_dir": str(output_dir)}, allow_extra_keys=False
    )
    points: Curve = []
    with training_callbacks([reward_curve_callback(points, every, n, seed=config.get("seed", 0))]):
        module.main(*parsed)
    return points


def reward_curves(out_dir: Path, runs: dict[str, dict[str, Any]], every: int = 10, n: int = 200) -> dict[str, Curve]:
    """Pipeline stage: `runs` = {label: {"method": name, "config": stage config}}; writes curves.json + PNG."""
    curves = {
        label: train_with_curve(run["method"], run["config"], out_dir / "models" / label, every, n)
        for label, run in runs.items()
    }
    (out_dir / "curves.json").write_text(json.dumps(curves, indent=2))
    plot_curves({"0": curves}, out_dir / "reward_vs_steps.png")
    return curves


def steps_to_90(points: Curve) -> int | None:
    """First measured step reaching 90% of the run's reward gain (start → final); None if it never gains."""
    start, final = points[0]["reward"], points[-1]["reward"]
    if final <= start:
        return None
    return next(int(p["step"]) for p in points if p["reward"] >= start + 0.9 * (final - start))


def plot_curves(curves_by_seed: dict[str, dict[str, Curve]], path: Path, title: str | None = None) -> None:
    """Mean reward per measured step over seeds (± 1 sd band when there are several), one line per method."""

    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(m for per_seed in curves_by_seed.values() for m in per_seed))
    for method in methods:
        curves = [per_seed[method] for per_seed in curves_by_seed.values() if method in per_seed]
        steps = [p["step"] for p in curves[0]]
        curves = [c for c in curves if [p["step"] for p in c] == steps]
        mean = [statistics.mean(c[i]["reward"] for c in curves) for i in range(len(steps))]
        line = ax.plot(steps, mean, marker="o", label=f"{method} (n={len(curves)})" if len(curves) > 1 else method)[0]
        if len(curves) > 1:
            sd = [statistics.stdev(c[i]["reward"] for c in curves) for i in range(len(steps))]
            low, high = [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)]
            ax.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ground-truth reward (greedy, held-out prompts)")
    ax.set_title(title or "Student reward while training, from the same SFT model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
