"""TRL's `DistillationTrainer`, through its public API, as a pipeline `call` stage: the baseline of the `kd` family.

Same student, teacher, prompts, optimizer steps, batch size, completion length, schedule and seed as the `kd`
stages of `bench/reproduce.py`; TRL's generalized JSD with `beta` (0 = forward KL, 1 = reverse KL) on the student's
own samples (TRL's trainer is on-policy). Saves the student in the stage folder, as a `train` stage would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train(
    out_dir: Path,
    model_name_or_path: str,
    teacher_model_name_or_path: str,
    dataset_name: str,
    max_steps: int,
    learning_rate: float,
    beta: float,
    seed: int,
    per_device_train_batch_size: int = 32,
    max_completion_length: int = 16,
    temperature: float = 1.0,
    lr_scheduler_type: str = "linear",
    **training_arguments: Any,
) -> dict[str, Any]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=str(out_dir),
        max_steps=max_steps,
        learning_rate=learning_rate,
        beta=beta,
        seed=seed,
        per_device_train_batch_size=per_device_train_batch_size,
        max_completion_length=max_completion_length,
        temperature=temperature,
        lr_scheduler_type=lr_scheduler_type,
        bf16=False,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        **training_arguments,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    student = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype="float32", use_safetensors=True)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_model_name_or_path, dtype="float32", use_safetensors=True)
    dataset = load_dataset("json", data_files=dataset_name, split="train").select_columns(["prompt"])
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    result = trainer.train()
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {"train_loss": result.training_loss, "global_step": result.global_step}
