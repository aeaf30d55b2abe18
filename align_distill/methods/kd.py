"""`align-distill train kd`: general knowledge distillation from one teacher (docs/methods/kd.md, "Trainer").

Off-policy on the dataset's completions (`lmbda: 0`), on-policy or mixed on the student's own samples (`lmbda` > 0,
GKD), with a live teacher (full logits) or a teacher-signal cache (top-k, off-policy only); the divergence is
`divergence` (forward_kl, reverse_kl, jsd, skew_*_kl, tvd, akl, taid).
"""

from __future__ import annotations

from trl import ModelConfig

from align_distill.models import load_tokenizer
from align_distill.trainers.kd import KDConfig, KDTrainer

from .common import DataArguments, load_method_dataset, require_dataset, train_student

HELP = "KD: distil one teacher (live or signal cache) with a chosen divergence, off- or on-policy (GKD's lmbda), TAID"
DATA_FORMAT = "completion"
DATACLASSES = (DataArguments, KDConfig, ModelConfig)


def main(data_args: DataArguments, training_args: KDConfig, model_args: ModelConfig) -> dict:

    require_dataset(data_args, "kd")
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code, what="model"
    )
    prompt_only = training_args.lmbda == 1.0  # every batch is sampled: the completions would never be read
    routing = (training_args.teacher_routing_column,) if training_args.teacher_routing_column else ()
    train, evaluation = load_method_dataset(
        data_args,
        "prompt" if prompt_only else DATA_FORMAT,
        tokenizer,
        training_args.max_length,
        (("id", "prompt") if prompt_only else ("id", "prompt", "completion")) + routing,
    )
    return train_student(KDTrainer, model_args, training_args, tokenizer, train, evaluation)
