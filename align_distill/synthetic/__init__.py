"""The embedded default task (see `task.py`): prompts, data, ground-truth reward and evaluation."""

from .evaluate import Evaluation, evaluate, generate_responses
from .task import (
    Reward,
    answer,
    preference_rows,
    prompt_rows,
    prompts,
    respond,
    reward,
    sft_rows,
    task_corpus,
)

__all__ = [
    "Evaluation",
    "Reward",
    "answer",
    "evaluate",
    "generate_responses",
    "preference_rows",
    "prompt_rows",
    "prompts",
    "respond",
    "reward",
    "sft_rows",
    "task_corpus",
]
