"""What every method's script shares: the data arguments, CPU-aware defaults, and dataset/model preparation.

Validation runs before any model is loaded, so a bad dataset fails in seconds with every problem listed.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trl import get_peft_config

from align_distill.data import load_dataset_for
from align_distill.errors import ConfigError
from align_distill.models import load_model

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
    """Where the training data lives and how to treat rows that do not fit (TRL's `ScriptArguments` names).

    Parameters:
        dataset_name (`str`):
            A jsonl/json/parquet/csv file, a `datasets.save_to_disk` folder, a data_gen store or a hub dataset name
            (online only).
        dataset_config (`str`, *optional*):
            Configuration name of a hub dataset (`datasets.load_dataset(name, config)`); an error for local data.
        dataset_train_split (`str`, defaults to `"train"`):
            Split to train on (folders and hub datasets with several splits).
        dataset_test_split (`str`, *optional*):
            Split of `dataset_name` to evaluate on.
        eval_dataset_path (`str`, *optional*):
            Evaluation data from another file/folder, in the same format (its `train` split).
        length_policy (`str`, defaults to `"error"`):
            Rows longer than `max_length`: `error` (list them and stop), `truncate` (cut the response) or `drop`.

    Deprecated keys (one release): `dataset_path` → `dataset_name`, `dataset_split` → `dataset_train_split`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {
        "dataset_path": "dataset_name",
        "dataset_split": "dataset_train_split",
    }

    dataset_name: str | None = field(
        default=None, metadata={"help": "Training data: a file, a saved folder, a data_gen store or a hub name."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration name (TRL's dataset_config)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split of dataset_name to evaluate on (optional)."}
    )
    eval_dataset_path: str | None = field(
        default=None, metadata={"help": "Evaluation data from another file or folder, in the same format."}
    )
    length_policy: str = field(
        default="error",
        metadata={
            "help": "Rows longer than max_length: error | truncate | drop.",
            "choices": ["error", "truncate", "drop"],
        },
    )

    def __post_init__(self) -> None:
        if self.dataset_test_split is not None and self.eval_dataset_path is not None:
            raise ConfigError(
                "DataArguments: set either `dataset_test_split` (a split of dataset_name) or `eval_dataset_path` "
                "(another file), not both"
            )


def require_dataset(data_args: DataArguments, method: str) -> str:
    if not data_args.dataset_name:
        raise SystemExit(f"align-distill train {method}: set dataset_name (in the YAML config or --dataset_name)")
    return data_args.dataset_name


def evaluation_source(data_args: DataArguments) -> tuple[str, str] | None:
    """(path, split) of the evaluation data: `eval_dataset_path` (its train split) or `dataset_name` at
    `dataset_test_split`; None without either."""
    if data_args.eval_dataset_path:
        return data_args.eval_dataset_path, "train"
    if data_args.dataset_test_split:
        return data_args.dataset_name, data_args.dataset_test_split
    return None


def load_method_dataset(
    data_args: DataArguments, format: str, tokenizer: Any, max_length: int | None, columns: tuple[str, ...]
) -> tuple[Any, Any | None]:
    """Validate and load train (and eval) data in `format`, keeping only `columns` for the trainer."""

    def load(path: str, split: str):
        dataset = load_dataset_for(
            path,
            format,
            split=split,
            tokenizer=tokenizer,
            max_length=max_length,
            length_policy=data_args.length_policy,
            config=data_args.dataset_config,
        )
        return dataset.select_columns([c for c in columns if c in dataset.column_names])

    train = load(data_args.dataset_name, data_args.dataset_train_split)
    source = evaluation_source(data_args)
    evaluation = load(*source) if source else None
    logger.info("loaded %d training rows from %s", len(train), data_args.dataset_name)
    return train, evaluation


def peft_config_from(model_args: Any):
    """TRL's LoRA config from ModelConfig (`use_peft`, `lora_r`, ...), or None."""

    return get_peft_config(model_args)


def train_student(
    trainer_class: Any, model_args: Any, training_args: Any, tokenizer: Any, train: Any, evaluation: Any = None
) -> dict:
    """Load the student, train it with `trainer_class` (a TRL-style trainer), save model + tokenizer; the metrics.

    Every method's script ends the same way; only the trainer class and the data differ.
    """

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
