"""Reading a job's input rows: `align_distill.data` loads and validates them (errors name file, row and column),
this module adds reading another job's store, job-level checks and the input's content hash for the fingerprint."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import datasets
import pyarrow as pa

from align_distill.data import DataProblem, DataValidationError, read_records, stores, validate
from align_distill.data.loading import records_to_dataset
from align_distill.data_gen.store import INPUT_INDEX, load_store

logger = logging.getLogger("align_distill.data_gen")


def load_inputs(
    source: str,
    format: str | Callable[[list[str]], str],
    split: str = "train",
    limit: int | None = None,
    keep: Any = None,
) -> datasets.Dataset:
    """Rows of `source` validated as `format` ("prompt", "completion", "preference", "ranking"; or a function of
    the column names that picks one), with string ids.

    `limit` keeps the first rows only; `keep(record) -> bool` drops rows before validation (logged), e.g. rows
    whose ranking failed.
    """
    records = _read_store(source) if is_store(source) else read_records(source, split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (or null for all rows), got {limit}")
        records = records.select(range(min(limit, len(records)))) if hasattr(records, "select") else records[:limit]
    if keep is not None:
        kept = [record for record in records if keep(record)]
        if len(kept) < len(records):
            logger.warning("%s: skipped %d of %d rows", source, len(records) - len(kept), len(records))
        records = kept
    columns = (
        list(records.column_names)
        if hasattr(records, "column_names")
        else list(dict.fromkeys(key for record in records for key in record))
    )
    if callable(format):
        format = format(columns)
    if format != "preference" and columns and "prompt" not in columns:
        raise DataValidationError(
            [DataProblem(source, None, "prompt", f"missing column (columns found: {', '.join(columns)})")]
        )
    report = validate(records, format, source=source)
    if report.problems:
        raise DataValidationError(report.problems)
    return _to_dataset(report.rows, source)


def _to_dataset(rows: list[dict[str, Any]], source: str) -> datasets.Dataset:
    """An in-memory Dataset of the validated rows, fingerprinted by content (skips `datasets`' pickling hash);
    rows whose columns arrow cannot type go through `records_to_dataset` for an error naming the cells."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return records_to_dataset(rows, source)
    return datasets.Dataset(table, fingerprint=_table_digest(table)[:16])


def is_store(source: str) -> bool:
    """Whether `source` is the output folder of another job (read through its manifests)."""
    return stores.is_store(source)


def _read_store(source: str) -> datasets.Dataset:
    dataset = load_store(source)
    return dataset.remove_columns([INPUT_INDEX]) if INPUT_INDEX in dataset.column_names else dataset


def require_columns(dataset: datasets.Dataset, columns: list[str], source: str, why: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataValidationError(
            [
                DataProblem(
                    source,
                    None,
                    column,
                    f"missing column, needed {why} (columns found: {', '.join(dataset.column_names)})",
                )
                for column in missing
            ]
        )


def dataset_digest(dataset: datasets.Dataset) -> str:
    """sha256 of the rows' arrow data (IPC stream of the combined table): equal rows give equal digests."""
    return _table_digest(dataset.data.table)


def _table_digest(table: pa.Table) -> str:
    table = table.combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
