"""The embedded default task (see `task.py`): prompts, data, ground-truth reward and evaluation."""

from .evaluate import Evaluation, evaluate, generate_responses
from .task import (
    DATA_SIZES,
    EVAL_SIZES,
    SPLITS,
    Reward,
    answer,
    evaluation_prompts,
    preference_rows,
    prompt_rows,
    prompts,
    respond,
    reward,
    sft_rows,
    split_of,
    task_corpus,
    task_data,
    task_splits,
)

__all__ = [
    "DATA_SIZES",
    "EVAL_SIZES",
    "SPLITS",
    "Evaluation",
    "Reward",
    "answer",
    "evaluate",
    "evaluation_prompts",
    "generate_responses",
    "preference_rows",
    "prompt_rows",
    "prompts",
    "respond",
    "reward",
    "sft_rows",
    "split_of",
    "task_corpus",
    "task_data",
    "task_splits",
]
