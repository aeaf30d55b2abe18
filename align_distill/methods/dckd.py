"""`align-distill train dckd`: DCKD — SFT on the chosen response + KL(DPO teacher ‖ student) on chosen and rejected.

The teacher comes from a teacher-signal cache (`align-distill generate signals` on the same preference data,
`teacher_mode: cache`, the default) or is loaded next to the student (`teacher_mode: live`).
"""

from __future__ import annotations

from typing import Any

from trl import ModelConfig

from align_distill.trainers.dckd import DCKDConfig

from .common import DataArguments, load_method_dataset, require_dataset, train_student

HELP = "DCKD: SFT(chosen) + KL(DPO teacher || student) on chosen and rejected (signal cache or live teacher)"
DATA_FORMAT = "preference"
DATACLASSES = (DataArguments, DCKDConfig, ModelConfig)


def main(data_args: DataArguments, training_args: DCKDConfig, model_args: ModelConfig) -> dict:
    from align_distill.models import load_tokenizer
    from align_distill.trainers.dckd import DCKDTrainer

    require_dataset(data_args, "dckd")
    tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code)
    train, evaluation = load_method_dataset(
        data_args, DATA_FORMAT, tokenizer, training_args.max_length, ("id", "prompt", "chosen", "rejected")
    )
    return train_student(DCKDTrainer, model_args, training_args, tokenizer, train, evaluation)


# Quickstart settings (tiny models on a CPU): tuned so that DCKD moves the SFT student towards the DPO teacher.
QUICKSTART: dict[str, Any] = {
    "max_steps": 60,
    "learning_rate": 1e-3,
    "chosen_kl_weight": 1.0,
    "rejected_kl_weight": 1.0,
}


def signals_stage(name: str, teacher: str, tokenizer: str) -> Any:
    """`generate signals` of the DPO teacher on the quickstart pairs' chosen and rejected responses."""
    from align_distill.pipeline import Stage

    return Stage(
        name,
        "generate",
        "signals",
        {
            "input": "${data}/pairs.jsonl",
            "teachers": [{"name": "dpo", "model": teacher}],
            "tokenizer": tokenizer,
            "top_k": 50,
            "progress": False,
        },
    )


def dckd_stages(prefix: str, seed: int, student: str = "${student_sft}") -> list[Any]:
    from align_distill.pipeline import Stage
    from align_distill.quickstart import COMMON

    config = {
        **COMMON,
        "model_name_or_path": student,
        "dataset_path": "${data}/pairs.jsonl",
        "signals_path": f"${{{prefix}_signals}}",
        **QUICKSTART,
        "seed": seed,
    }
    return [
        signals_stage(f"{prefix}_signals", "${teacher_dpo}", student),
        Stage(f"{prefix}_student", "train", "dckd", config),
    ]


def quickstart_stages(seed: int) -> list[Any]:
    """DPO-teacher signals on the pairs, then DCKD from the SFT student (last stage: the DCKD student)."""
    return dckd_stages("dckd", seed)
