"""`align-distill train dckd`: DCKD — SFT on the chosen response + KL(DPO teacher ‖ student) on chosen and rejected.

The teacher comes from a teacher-signal cache (`align-distill generate signals` on the same preference data,
`teacher_mode: cache`, the default), is loaded next to the student (`teacher_mode: model`), is a vLLM server
(`teacher_mode: server`) or several teachers (`teachers`); see docs/teachers.md.
"""

from __future__ import annotations

from trl import ModelConfig

from align_distill.models import load_tokenizer
from align_distill.trainers.dckd import DCKDConfig, DCKDTrainer

from .common import DataArguments, load_method_dataset, require_dataset, train_student

HELP = "DCKD: SFT(chosen) + KL(DPO teacher || student) on chosen and rejected (signal cache or live teacher)"
DATA_FORMAT = "preference"
DATACLASSES = (DataArguments, DCKDConfig, ModelConfig)


def main(data_args: DataArguments, training_args: DCKDConfig, model_args: ModelConfig) -> dict:

    require_dataset(data_args, "dckd")
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code, what="model"
    )
    routing = (training_args.teacher_routing_column,) if training_args.teacher_routing_column else ()
    train, evaluation = load_method_dataset(
        data_args, DATA_FORMAT, tokenizer, training_args.max_length, ("id", "prompt", "chosen", "rejected", *routing)
    )
    return train_student(DCKDTrainer, model_args, training_args, tokenizer, train, evaluation)
