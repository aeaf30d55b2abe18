"""`align-distill train adpa`: ADPA — SFT on the chosen response + the DPO teacher's advantage (against its
reference) maximised on the student's own responses. ADPA+ is the same command started from a DCKD student with
that student's rollouts (`align_distill/configs/adpa/plus_pipeline.yaml`).

Rows: `id`, `prompt`, `chosen` and the student responses' ids (`completion_ids` of the `rollout` job), read from
`dataset_name` (a rollout or signals store, or a file); with `teacher_mode: cache` and no `dataset_name`, the
signal store itself (the `signals` job keeps the rollout's columns). `preference_path` supplies `chosen` by row id
when the response rows lack it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datasets import Value
from trl import ModelConfig

from align_distill.data import load_dataset_for
from align_distill.data import load_rows as load_file_rows
from align_distill.data.responses import check_response_rows
from align_distill.models import load_tokenizer
from align_distill.trainers.adpa import ADPAConfig, ADPATrainer

from .common import DataArguments, train_student

HELP = "ADPA: SFT(chosen) + advantage of a DPO teacher vs its reference on student rollouts (ADPA+ after DCKD)"
DATA_FORMAT = None  # store rows (prompt, chosen, completion_ids), checked by the trainer; see the module docstring


@dataclass
class ADPADataArguments(DataArguments):
    """`DataArguments` where `dataset_name` holds the student responses, plus `preference_path`.

    Parameters:
        dataset_name (`str`, *optional*):
            Student responses with their prompt and chosen: a `rollout` / `signals` store folder or a file with
            `id`, `prompt`, `chosen`, `completion_ids`. Default in cache mode: `signals_path`.
        preference_path (`str`, *optional*):
            Preference data giving each row's `chosen` by `id` (when the response rows have none).
    """

    preference_path: str | None = field(
        default=None, metadata={"help": "Preference data giving `chosen` by row id (if the responses lack it)."}
    )


DATACLASSES = (ADPADataArguments, ADPAConfig, ModelConfig)


def load_rows(path: str, split: str = "train") -> Any:
    """A store folder (rollout / signals) or a data file, as a `datasets.Dataset` with string ids."""
    rows = load_file_rows(path, split)
    if "id" not in rows.column_names:
        raise SystemExit(f"align-distill train adpa: {path} has no `id` column; use the rollout job's output")
    return rows if rows.features["id"].dtype == "string" else rows.cast_column("id", Value("string"))


def join_chosen(rows: Any, preference_path: str, split: str) -> Any:
    """`chosen` of each response row from the preference data, by row id (a missing id is an error naming it)."""

    preference = load_dataset_for(preference_path, "preference", split=split)
    chosen = dict(zip(preference["id"], preference["chosen"]))
    missing = [row_id for row_id in rows["id"] if row_id not in chosen]
    if missing:
        raise SystemExit(
            f"align-distill train adpa: {len(missing)} response rows have no preference row in {preference_path} "
            f"(first: id {missing[0]!r})"
        )
    rows = rows.remove_columns([c for c in ("chosen",) if c in rows.column_names])
    return rows.map(lambda row: {"chosen": chosen[row["id"]]})


def main(data_args: ADPADataArguments, training_args: ADPAConfig, model_args: ModelConfig) -> dict:
    path = data_args.dataset_name or (training_args.signals_path if training_args.teacher_mode == "cache" else None)
    if not path:
        raise SystemExit("align-distill train adpa: set dataset_name (the student rollout store) or signals_path")
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code, what="model"
    )

    def rows(source: str, split: str) -> Any:
        """The response rows of `source`, their `chosen` joined from preference_path, checked (file/row/column)."""
        loaded = load_rows(source, split)
        if data_args.preference_path:
            loaded = join_chosen(loaded, data_args.preference_path, split)
        check_response_rows(loaded, source, f"{training_args.response_column}_ids", len(tokenizer))
        return loaded

    train = rows(path, data_args.dataset_train_split)
    if data_args.eval_dataset_path:
        evaluation = rows(data_args.eval_dataset_path, "train")
    elif data_args.dataset_test_split:
        evaluation = rows(path, data_args.dataset_test_split)
    else:
        evaluation = None
    return train_student(ADPATrainer, model_args, training_args, tokenizer, train, evaluation)
