"""`align-distill train dpo`: TRL's DPOTrainer; with `reverse`, chosen and rejected are swapped.

The reverse-DPO model (trained to prefer the rejected response) is AlignDistil's contrast model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig, DPOTrainer, ModelConfig

from align_distill.models import load_tokenizer
from align_distill.trainers.common import default_precision

from .common import (
    DataArguments,
    load_method_dataset,
    require_dataset,
    train_student,
)

HELP = "DPO on preference pairs (TRL DPOTrainer); --reverse trains the reverse-DPO model"
DATA_FORMAT = "preference"


@dataclass
class AlignDistillDPOConfig(DPOConfig):
    """TRL's `DPOConfig` plus `reverse`.

    Parameters:
        reverse (`bool`, defaults to `False`):
            Swap chosen and rejected: trains the reverse-DPO model that AlignDistil contrasts with the DPO model.

    Changed default: `bf16=None` means bf16 only on a CUDA device that supports it. See `trl.DPOConfig` for the rest.
    """

    reverse: bool = field(default=False, metadata={"help": "Swap chosen and rejected (the reverse-DPO model)."})

    def __post_init__(self) -> None:
        default_precision(self)
        super().__post_init__()


DATACLASSES = (DataArguments, AlignDistillDPOConfig, ModelConfig)


def swap_chosen_rejected(row: dict) -> dict:
    return {**row, "chosen": row["rejected"], "rejected": row["chosen"]}


def main(data_args: DataArguments, training_args: AlignDistillDPOConfig, model_args: ModelConfig) -> dict:

    require_dataset(data_args, "dpo")
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code, what="model"
    )
    train, evaluation = load_method_dataset(
        data_args, DATA_FORMAT, tokenizer, training_args.max_length, ("prompt", "chosen", "rejected")
    )
    if training_args.reverse:
        train = train.map(swap_chosen_rejected)
        evaluation = evaluation.map(swap_chosen_rejected) if evaluation is not None else None
    return train_student(DPOTrainer, model_args, training_args, tokenizer, train, evaluation)
