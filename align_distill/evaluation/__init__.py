"""Evaluation of any model: answers through the data-generation store, scored by a pairwise LLM judge against a
baseline (win-rate and length-controlled win-rate), a reward model and/or Python checkers, with bootstrap intervals
(`statistics`, the project's one implementation). `align-distill evaluate` and the pipeline's `evaluate` stages run
`run_evaluation`."""

from .config import (
    EvaluateConfig,
    EvaluatedModel,
    GenerationSettings,
    PairwiseJudge,
    RewardModel,
    load_evaluate_config,
)
from .run import RESULTS_FILE, EvaluationError, run_evaluation

__all__ = [
    "RESULTS_FILE",
    "EvaluateConfig",
    "EvaluatedModel",
    "EvaluationError",
    "GenerationSettings",
    "PairwiseJudge",
    "RewardModel",
    "load_evaluate_config",
    "run_evaluation",
]
