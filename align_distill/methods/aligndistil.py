"""`align-distill train aligndistil`: AlignDistil (docs/methods/aligndistil.md) with the DPO and reverse-DPO models.

The student starts from the SFT model. Off-policy it trains on the dataset's chosen responses; with
`--on_policy true` on its own samples for the dataset's prompts (transformers or vLLM rollouts).
"""

from __future__ import annotations

import logging
from typing import Any

from trl import ModelConfig

from align_distill.models import check_tokenizer_compatibility, load_tokenizer
from align_distill.trainers.aligndistil import AlignDistilConfig, AlignDistilTrainer

from .common import DataArguments, load_method_dataset, require_dataset, train_student

logger = logging.getLogger(__name__)

HELP = "AlignDistil: token-adaptive distillation from a DPO + reverse-DPO teacher pair (off- or on-policy)"
DATA_FORMAT = "preference"

DATACLASSES = (DataArguments, AlignDistilConfig, ModelConfig)


def _check_tokenizers(tokenizer: Any, paths: dict[str, str | None]) -> None:
    """The student's tokenizer must be the teachers' (same ids, template, specials); folders without one pass."""

    for name, path in paths.items():
        if path is None:
            continue
        try:
            other = load_tokenizer(path)
        except (OSError, ValueError):
            logger.warning("no tokenizer in %s (%s); assuming it shares the student's", path, name)
            continue
        check_tokenizer_compatibility(other, tokenizer, (name, "student"))


def main(data_args: DataArguments, training_args: AlignDistilConfig, model_args: ModelConfig) -> dict:

    require_dataset(data_args, "aligndistil")
    if not training_args.teacher_model_name_or_path or not training_args.reference_model_name_or_path:
        raise SystemExit(
            "align-distill train aligndistil: set teacher_model_name_or_path (the DPO model) and "
            "reference_model_name_or_path (the reverse-DPO model)"
        )
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code, what="model"
    )
    _check_tokenizers(
        tokenizer,
        {
            "DPO model": training_args.teacher_model_name_or_path,
            "reverse-DPO model": training_args.reference_model_name_or_path,
        },
    )
    on_policy = training_args.on_policy
    train, evaluation = load_method_dataset(
        data_args,
        "prompt" if on_policy else DATA_FORMAT,  # on-policy needs prompts only
        tokenizer,
        training_args.max_length,
        ("prompt",) if on_policy else ("prompt", "chosen"),
    )
    return train_student(AlignDistilTrainer, model_args, training_args, tokenizer, train, evaluation)
