"""Rows of student responses given as token ids (the `rollout` job's output; ADPA's training rows): checked before
any model loads, so a bad row is named by file, row and column instead of failing deep inside a loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .problems import DataProblem, DataValidationError


def response_row_problems(
    rows: Any, source: str, ids_column: str, vocab_size: int, text_columns: Sequence[str] = ("prompt", "chosen")
) -> list[DataProblem]:
    """Every problem of `rows` (a `datasets.Dataset` or a list of dicts): a missing column; an empty or repeated
    `id`; an empty text column; `ids_column` not a non-empty list of integer token ids below `vocab_size`."""
    columns = rows.column_names if hasattr(rows, "column_names") else sorted({k for row in rows for k in row})
    required = ["id", *text_columns, ids_column]
    missing = [c for c in required if c not in columns]
    if missing:
        found = ", ".join(columns)
        return [DataProblem(source, None, c, f"missing column (columns found: {found})") for c in missing]
    problems: list[DataProblem] = []
    first_row: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        row_id = row["id"]
        if row_id is None or str(row_id).strip() == "":
            problems.append(DataProblem(source, number, "id", "empty id: every response row needs its prompt's id"))
        elif str(row_id) in first_row:
            problems.append(
                DataProblem(
                    source, number, "id", f"id {row_id!r} repeats row {first_row[str(row_id)]}; ids are unique"
                )
            )
        else:
            first_row[str(row_id)] = number
        for column in text_columns:
            if not row[column]:
                problems.append(DataProblem(source, number, column, "empty: a text or a message list is needed"))
        problem = _token_ids_problem(row[ids_column], vocab_size)
        if problem:
            problems.append(DataProblem(source, number, ids_column, problem))
    return problems


def _token_ids_problem(ids: Any, vocab_size: int) -> str | None:
    if not isinstance(ids, (list, tuple)) or not ids:
        return f"expected a non-empty list of token ids, found {type(ids).__name__} {str(ids)[:40]!r}"
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        return f"token ids must be integers, found {type(bad[0]).__name__} {bad[0]!r}"
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        return f"token id {outside[0]} is outside the tokenizer's vocabulary (0..{vocab_size - 1}); wrong tokenizer?"
    return None


def check_response_rows(
    rows: Any, source: str, ids_column: str, vocab_size: int, text_columns: Sequence[str] = ("prompt", "chosen")
) -> None:
    """Raise DataValidationError listing every problem of `response_row_problems`, if any."""
    problems = response_row_problems(rows, source, ids_column, vocab_size, text_columns)
    if problems:
        raise DataValidationError(problems)
