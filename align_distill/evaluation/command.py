"""`align-distill evaluate --config FILE|RECIPE [--key value ...]`: score models with a judge, a reward model and/or
checkers (see `EvaluateConfig`). (`align-distill evaluate speculative ...` is another command, dispatched by
`align_distill.commands.evaluate`.)"""

from __future__ import annotations

import logging

from align_distill import configuration

from .config import (
    USAGE,
    EvaluateConfig,
    EvaluatedModel,
    GenerationSettings,
    PairwiseJudge,
    RewardModel,
    load_evaluate_config,
)
from .run import run_evaluation

# the nested keys `--help` lists too (`--generation.temperature 0.7`, `--pairwise_judge.model judge`)
NESTED = {
    "models.LABEL": EvaluatedModel,
    "generation": GenerationSettings,
    "pairwise_judge": PairwiseJudge,
    "reward_model": RewardModel,
}


def main(argv: list[str], subcommands: tuple[str, ...] = ()) -> int:
    """Run an evaluation from the command line; returns the exit code (errors are raised for the CLI to print)."""
    if not argv or "-h" in argv or "--help" in argv:
        print(configuration.describe_dataclass(EvaluateConfig, USAGE))
        for key, cls in NESTED.items():
            print(f"\n{key}.KEY ({cls.__name__}):", *configuration.field_lines(cls, full=False), sep="\n")
        for name in subcommands:
            print(f"\nalso: align-distill evaluate {name} ... (`align-distill evaluate {name} --help`)")
        return 0 if argv else 2
    path, rest = configuration.split_config_argument(argv)
    config = load_evaluate_config(path, rest)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = run_evaluation(config)
    for label, summary in results["models"].items():
        parts = [f"{m} {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for m, v in summary["metrics"].items()]
        judge = summary.get("judge") or {}
        if "win_rate" in judge:
            w, lc = judge["win_rate"], judge["lc_win_rate"]
            parts.append(f"win-rate {w['mean']:.3f} [{w['low']:.3f}, {w['high']:.3f}], LC {lc['win_rate']:.3f}")
        if judge.get("unparsable"):
            parts.append(f"{judge['unparsable']} unparsable verdicts")
        print(f"  {label:24s} " + "; ".join(parts), flush=True)
    print(f"evaluate: done; report in {config.output_dir}/report.md")
    return 0
