"""`align-distill train aligndistil`: AlignDistil (specs/aligndistil.md) with the DPO and reverse-DPO models.

The student starts from the SFT model. Off-policy it trains on the dataset's chosen responses; with
`--on_policy true` on its own samples for the dataset's prompts (transformers or vLLM rollouts).
"""

from __future__ import annotations

import logging
from typing import Any

from trl import ModelConfig

from align_distill.pipeline import Stage
from align_distill.trainers.aligndistil import AlignDistilConfig

from .common import DataArguments, load_method_dataset, require_dataset, train_student

logger = logging.getLogger(__name__)

HELP = "AlignDistil: token-adaptive distillation from a DPO + reverse-DPO teacher pair (off- or on-policy)"
DATA_FORMAT = "preference"

DATACLASSES = (DataArguments, AlignDistilConfig, ModelConfig)


def _check_tokenizers(tokenizer: Any, paths: dict[str, str | None]) -> None:
    """The student's tokenizer must be the teachers' (same ids, template, specials); folders without one pass."""
    from align_distill.models import check_tokenizer_compatibility, load_tokenizer

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
    from align_distill.models import load_tokenizer
    from align_distill.trainers.aligndistil import AlignDistilTrainer

    require_dataset(data_args, "aligndistil")
    if not training_args.dpo_model_path or not training_args.rev_dpo_model_path:
        raise SystemExit("align-distill train aligndistil: set dpo_model_path and rev_dpo_model_path")
    tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code)
    _check_tokenizers(
        tokenizer, {"DPO model": training_args.dpo_model_path, "reverse-DPO model": training_args.rev_dpo_model_path}
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


# ---- quickstart -------------------------------------------------------------------------------------------------

# Tiny models, CPU: far larger steps than the released 1e-6 (which is for 1.5B models and 61k pairs).
QUICKSTART_COMMON: dict[str, Any] = {
    "model_name_or_path": "${student_sft}",
    "dpo_model_path": "${teacher_dpo}",
    "rev_dpo_model_path": "${teacher_rev_dpo}",
    "dataset_path": "${data}/pairs.jsonl",
    "bf16": False,
    "gradient_checkpointing": False,
    "save_strategy": "no",
    "report_to": "none",
    "logging_steps": 10,
    "max_length": 64,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
    "per_device_train_batch_size": 32,
    "beta": 0.1,
    "learning_rate": 2e-4,
    "warmup_steps": 0.1,
}


def quickstart_stages(seed: int) -> list[Stage]:
    """Off-policy AlignDistil on the quickstart's chosen responses (stage `aligndistil_off`, the evaluated one)."""
    config = {**QUICKSTART_COMMON, "max_steps": 60, "tvd_scale": 10.0, "seed": seed}
    return [Stage("aligndistil_off", "train", "aligndistil", config)]


def quickstart_stages_on(seed: int) -> list[Stage]:
    """On-policy AlignDistil with transformers rollouts of the student (stage `aligndistil_on`)."""
    config = {
        **QUICKSTART_COMMON,
        "max_steps": 60,
        "tvd_scale": 15.0,
        "on_policy": True,
        "max_new_tokens": 16,
        "seed": seed,
    }
    return [Stage("aligndistil_on", "train", "aligndistil", config)]
