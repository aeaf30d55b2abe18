"""`align-distill train sft`: TRL's SFTTrainer on prompt/completion data (teacher or student preparation).

Loss is on the completion only (TRL's prompt-completion behaviour), with the tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import ModelConfig, SFTConfig, SFTTrainer

from align_distill.models import load_tokenizer
from align_distill.trainers.common import default_precision

from .common import (
    DataArguments,
    load_method_dataset,
    require_dataset,
    train_student,
)

HELP = "supervised fine-tuning on prompt/completion data (TRL SFTTrainer)"
DATA_FORMAT = "completion"


@dataclass
class AlignDistillSFTConfig(SFTConfig):
    """TRL's `SFTConfig`, with one changed default: `bf16=None` means bf16 only on a CUDA device that supports it
    (TRL turns it on everywhere). See `trl.SFTConfig` for every other parameter."""

    def __post_init__(self) -> None:
        default_precision(self)
        super().__post_init__()


DATACLASSES = (DataArguments, AlignDistillSFTConfig, ModelConfig)


def main(data_args: DataArguments, training_args: AlignDistillSFTConfig, model_args: ModelConfig) -> dict:

    require_dataset(data_args, "sft")
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code, what="model"
    )
    train, evaluation = load_method_dataset(
        data_args, DATA_FORMAT, tokenizer, training_args.max_length, ("prompt", "completion")
    )
    return train_student(SFTTrainer, model_args, training_args, tokenizer, train, evaluation)
