"""What every method's script shares: the data arguments, CPU-aware defaults, and dataset/model preparation.

Validation runs before any model is loaded, so a bad dataset fails in seconds with every problem listed.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Extra `TrainerCallback`s for the trainers `train_student` builds: how a caller (reward curves, benchmarks) observes
# a method's own script without each script growing a parameter.
_EXTRA_CALLBACKS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("extra_callbacks", default=())


@contextlib.contextmanager
def training_callbacks(callbacks: list[Any]) -> Iterator[None]:
    """Within the block, every trainer `train_student` builds also gets `callbacks`."""
    token = _EXTRA_CALLBACKS.set(_EXTRA_CALLBACKS.get() + tuple(callbacks))
    try:
        yield
    finally:
        _EXTRA_CALLBACKS.reset(token)


@dataclass
class DataArguments:
    """Where the training data lives and how to treat rows that do not fit.

    Parameters:
        dataset_path (`str`):
            A jsonl/json/parquet/csv file, a `datasets.save_to_disk` folder, or a hub dataset name (online only).
        dataset_split (`str`, defaults to `"train"`):
            Split to train on (folders and hub datasets with several splits).
        eval_dataset_path (`str`, *optional*):
            Evaluation data in the same format.
        length_policy (`str`, defaults to `"error"`):
            Rows longer than `max_length`: `error` (list them and stop), `truncate` (cut the response) or `drop`.
    """

    dataset_path: str | None = field(
        default=None, metadata={"help": "Training data: a file, a saved folder or a hub name."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset_path: str | None = field(default=None, metadata={"help": "Evaluation data in the same format."})
    length_policy: str = field(
        default="error",
        metadata={
            "help": "Rows longer than max_length: error | truncate | drop.",
            "choices": ["error", "truncate", "drop"],
        },
    )


def default_precision(config: Any) -> None:
    """Resolve `bf16=None` to bf16 only where it helps (a CUDA device that supports it), not TRL's "always".

    On CPU bf16 autocast is slower than fp32 and changes results, so a recipe that says nothing trains in fp32.
    """
    if getattr(config, "bf16", None) is None:
        config.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not getattr(
            config, "fp16", False
        )


def require_dataset(data_args: DataArguments, method: str) -> str:
    if not data_args.dataset_path:
        raise SystemExit(f"align-distill train {method}: set dataset_path (in the YAML config or --dataset_path)")
    return data_args.dataset_path


def load_method_dataset(
    data_args: DataArguments, format: str, tokenizer: Any, max_length: int | None, columns: tuple[str, ...]
) -> tuple[Any, Any | None]:
    """Validate and load train (and eval) data in `format`, keeping only `columns` for the trainer."""
    from align_distill.data import load_dataset_for

    def load(path: str, split: str):
        dataset = load_dataset_for(
            path,
            format,
            split=split,
            tokenizer=tokenizer,
            max_length=max_length,
            length_policy=data_args.length_policy,
        )
        return dataset.select_columns([c for c in columns if c in dataset.column_names])

    train = load(data_args.dataset_path, data_args.dataset_split)
    evaluation = load(data_args.eval_dataset_path, "train") if data_args.eval_dataset_path else None
    logger.info("loaded %d training rows from %s", len(train), data_args.dataset_path)
    return train, evaluation


def peft_config_from(model_args: Any):
    """TRL's LoRA config from ModelConfig (`use_peft`, `lora_r`, ...), or None."""
    from trl import get_peft_config

    return get_peft_config(model_args)


def train_student(
    trainer_class: Any, model_args: Any, training_args: Any, tokenizer: Any, train: Any, evaluation: Any = None
) -> dict:
    """Load the student, train it with `trainer_class` (a TRL-style trainer), save model + tokenizer; the metrics.

    Every method's script ends the same way; only the trainer class and the data differ.
    """
    from align_distill.models import load_model

    model = load_model(
        model_args.model_name_or_path,
        dtype=model_args.dtype or "auto",
        trust_remote_code=training_args.trust_remote_code,
    )
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config_from(model_args),
        **({"callbacks": list(_EXTRA_CALLBACKS.get())} if _EXTRA_CALLBACKS.get() else {}),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_final(trainer, tokenizer, training_args.output_dir)
    return dict(result.metrics)


def save_final(trainer: Any, tokenizer: Any, output_dir: str) -> None:
    """Save the model (or adapter) and the tokenizer, so the folder loads as one checkpoint."""
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
