"""Reading datasets from local files (jsonl, json, parquet, csv), `save_to_disk` folders, the stores that
`align-distill generate` writes (see `stores.py`) or the hub.

Text files are parsed here rather than by `datasets.load_dataset`, so that a bad line or a cell of the wrong type is
reported with its file, row and column instead of a pyarrow cast error, and nothing is written to a cache.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .problems import DataProblem, DataValidationError
from .stores import StoreError, is_store, read_store

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
HUB_PROBE_TIMEOUT_S = 3.0
"""How long to wait for the hub to answer before calling it unreachable (offline must fail fast, not hang)."""

SURROGATE = re.compile("[\\ud800-\\udfff]")
"""A lone UTF-16 surrogate: `json.loads` accepts the escape, but the string can then never be encoded (arrow fails)."""

Records = Sequence[dict[str, Any]]
"""Rows as dicts: a list for text files, a `datasets.Dataset` (which iterates as dicts) for arrow sources."""


def load_rows(source: str, split: str = "train", config: str | None = None) -> datasets.Dataset:
    """Read `source` (a data file, a `save_to_disk` folder, a `generate` store or a hub dataset name) as a
    `datasets.Dataset`.

    Raises DataValidationError naming the file (and row and column where known) when it is missing, unreadable or
    corrupt, or when a column mixes types that one arrow column cannot hold. `config` is a hub dataset's
    configuration name (TRL's `dataset_config`).
    """
    records = read_records(source, split, config)
    if isinstance(records, datasets.Dataset):
        return records
    return records_to_dataset(records, source)


def read_records(source: str, split: str = "train", config: str | None = None) -> Records:
    """Read `source` into rows without forcing one type per column, so validation can name each bad cell."""
    path = Path(source).expanduser()
    if config is not None and (path.exists() or _looks_like_path(source)):
        _fail(source, f"`dataset_config` ({config!r}) names a hub dataset's configuration; local data has none")
    if path.is_dir():
        if is_store(path):
            return _read_store_folder(source, path, split)
        return _read_saved_folder(source, path, split)
    if path.is_file():
        if split != "train":
            _fail(source, f"a single file holds one split (train); split {split!r} was asked for")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(source, path)
        if suffix == ".json":
            return _read_json(source, path)
        if suffix == ".parquet":
            return _read_parquet(source, path)
        if suffix == ".csv":
            return _read_csv(source, path)
        _fail(source, f"unsupported file type {suffix or '(no suffix)'!r}; expected one of {', '.join(FILE_SUFFIXES)}")
    if _looks_like_path(source):
        _fail(source, "no such file or folder")
    return _read_hub(source, split, config)


def records_to_dataset(records: Records, source: str) -> datasets.Dataset:
    """Build an in-memory Dataset from rows; columns are the union of all rows' keys (absent cells become null)."""
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    table = {column: [record.get(column) for record in records] for column in columns}
    try:
        return datasets.Dataset.from_dict(table)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as error:
        problems = _mixed_type_problems(table, source)
        fallback = [DataProblem(source, None, None, f"cannot build a dataset: {error}")]
        raise DataValidationError(problems or fallback) from error


def _fail(source: str, message: str, row: int | None = None, column: str | None = None) -> NoReturn:
    raise DataValidationError([DataProblem(source, row, column, message)])


def _looks_like_path(source: str) -> bool:
    """A name with a data-file suffix, a path prefix or more than one '/' cannot be a hub id ('owner/name')."""
    return (
        source.lower().endswith(FILE_SUFFIXES)
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or os.sep != "/"
        and os.sep in source
    )


def _read_jsonl(source: str, path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; each line is decoded on its own, so a bad byte or escape names its line."""
    records: list[dict[str, Any]] = []
    problems: list[DataProblem] = []
    row = offset = 0
    try:
        with path.open("rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                offset += len(raw)
                if not raw.strip():
                    continue
                row += 1
                value = _parse_line(source, row, line_number, raw, offset - len(raw), problems)
                if value is not None:
                    records.append(value)
    except OSError as error:
        _fail(source, f"cannot read file: {error}")
    if problems:
        raise DataValidationError(problems)
    return records


def _parse_line(
    source: str, row: int, line_number: int, raw: bytes, offset: int, problems: list[DataProblem]
) -> dict[str, Any] | None:
    """The JSON object on one line, or None after adding its problem."""
    try:
        line = raw.decode("utf-8")
        value = json.loads(line)
    except UnicodeDecodeError as error:
        problems.append(DataProblem(source, row, None, _utf8_message(line_number, error.start, offset + error.start)))
        return None
    except json.JSONDecodeError as error:
        problems.append(
            DataProblem(
                source, row, None, f"line {line_number} is not valid JSON: {error.msg} (character {error.colno})"
            )
        )
        return None
    if not isinstance(value, dict):
        problems.append(
            DataProblem(
                source, row, None, f"line {line_number} holds a {type(value).__name__}, expected a JSON object"
            )
        )
        return None
    surrogate = _find_surrogate(value) if "\\u" in line else None
    if surrogate is not None:
        problems.append(
            DataProblem(source, row, surrogate[0], _surrogate_message(surrogate[1], f"line {line_number}: "))
        )
        return None
    return value


def _utf8_message(line_number: int, byte_in_line: int, byte_in_file: int) -> str:
    """Bytes counted from 1, like lines."""
    return (
        f"line {line_number} is not valid UTF-8 at byte {byte_in_line + 1} of the line (byte {byte_in_file + 1} of "
        "the file); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or fix that byte"
    )


def _surrogate_message(character: str, where: str = "") -> str:
    return (
        f"{where}lone surrogate \\u{ord(character):04x} in a JSON string (half of a UTF-16 pair), which no text "
        "encoding can hold; write the character itself, both halves of its pair (e.g. \\ud83d\\ude00), or remove it"
    )


def _find_surrogate(value: Any, column: str | None = None) -> tuple[str | None, str] | None:
    """(top-level key, the character) of the first lone surrogate in a JSON value's strings and keys, or None."""
    if isinstance(value, str):
        match = SURROGATE.search(value)
        return (column, match.group()) if match else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        top = column if column is not None or not isinstance(key, str) else key
        found = _find_surrogate(key, top) if isinstance(key, str) else None
        found = found or _find_surrogate(item, top)
        if found:
            return found
    return None


def _decode_utf8(source: str, data: bytes) -> str:
    """`data` as text, or a problem naming the line and byte of the first invalid UTF-8 sequence."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line_number = data.count(b"\n", 0, error.start) + 1
        _fail(source, _utf8_message(line_number, error.start - line_start, error.start))


def _read_json(source: str, path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects, an object mapping split names to arrays, or (like `datasets`) JSON Lines."""
    try:
        data = path.read_bytes()
    except OSError as error:
        _fail(source, f"cannot read file: {error}")
    text = _decode_utf8(source, data)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            _fail(source, f"not valid JSON: {error.msg} at line {error.lineno}, character {error.colno}")
        return _read_jsonl(source, path)
    if isinstance(value, dict) and isinstance(value.get("train"), list):
        value = value["train"]
    elif isinstance(value, dict):
        value = [value]  # a one-line JSON Lines file
    if not isinstance(value, list):
        _fail(source, f"holds a {type(value).__name__}, expected a JSON array of objects")
    problems = [
        DataProblem(source, row, None, f"array item holds a {type(item).__name__}, expected a JSON object")
        for row, item in enumerate(value, start=1)
        if not isinstance(item, dict)
    ]
    if not problems and "\\u" in text:
        problems = _surrogate_problems(source, value)
    if problems:
        raise DataValidationError(problems)
    return value


def _surrogate_problems(source: str, records: list[dict[str, Any]]) -> list[DataProblem]:
    problems = []
    for row, record in enumerate(records, start=1):
        found = _find_surrogate(record)
        if found:
            problems.append(DataProblem(source, row, found[0], _surrogate_message(found[1])))
    return problems


def _read_parquet(source: str, path: Path) -> datasets.Dataset:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        _fail(source, f"not a readable parquet file: {error}")
    return datasets.Dataset(table)


def _read_csv(source: str, path: Path) -> list[dict[str, Any]]:
    """Cells are strings; a cell that parses as a JSON list or object (conversations, rankings) is decoded."""
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))  # long responses are normal
    records: list[dict[str, Any]] = []
    problems: list[DataProblem] = []
    try:
        data = path.read_bytes()
    except OSError as error:
        _fail(source, f"cannot read CSV: {error}")
    try:
        with io.StringIO(_decode_utf8(source, data), newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                _fail(source, "empty file: expected a header row with the column names")
            duplicates = sorted({name for name in header if header.count(name) > 1})
            if duplicates:
                _fail(source, f"header repeats column name(s) {', '.join(duplicates)}")
            for row, cells in enumerate(reader, start=1):
                if len(cells) != len(header):
                    problems.append(
                        DataProblem(
                            source,
                            row,
                            None,
                            f"has {len(cells)} fields, the header has {len(header)} (line {reader.line_num})",
                        )
                    )
                    continue
                records.append({name: _decode_cell(cell) for name, cell in zip(header, cells)})
    except csv.Error as error:
        _fail(source, f"cannot read CSV: {error}")
    if problems:
        raise DataValidationError(problems)
    return records


def _decode_cell(cell: str) -> Any:
    if cell.lstrip()[:1] in ("[", "{"):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, (list, dict)):
            return value
    return cell


def _read_store_folder(source: str, path: Path, split: str) -> datasets.Dataset:
    """A `generate` store: exactly the committed rows its manifests list, in input order."""
    if split != "train":
        _fail(source, f"a generate store holds one split (train); split {split!r} was asked for")
    try:
        return read_store(path)
    except StoreError as error:
        _fail(source, f"cannot read generate store: {error}")


def _read_saved_folder(source: str, path: Path, split: str) -> datasets.Dataset:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        _fail(
            source,
            "folder is not a datasets.save_to_disk folder (no dataset_info.json or dataset_dict.json) nor a "
            f"generate store (no manifest.json); for data files, give the file path ({', '.join(FILE_SUFFIXES)})",
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # any failure here means a damaged folder; say which
        _fail(source, f"cannot load saved dataset: {type(error).__name__}: {error}")
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            _fail(source, f"has no split {split!r}; splits: {', '.join(loaded)}")
        return loaded[split]
    if split not in ("train", str(loaded.split) if loaded.split is not None else "train"):
        _fail(source, f"holds a single dataset (split {loaded.split or 'train'}); split {split!r} was asked for")
    return loaded


def _read_hub(source: str, split: str, config: str | None = None) -> datasets.Dataset:
    reason = hub_unavailable()
    if reason:
        _fail(source, f"no such file or folder, and it cannot be loaded as a hub dataset: {reason}")
    try:
        loaded = datasets.load_dataset(source, config, split=split)
    except Exception as error:  # the hub raises many types; all mean "cannot load this name"
        _fail(
            source, f"no such file or folder, and loading it as a hub dataset failed: {type(error).__name__}: {error}"
        )
    if not isinstance(loaded, datasets.Dataset):
        _fail(source, f"hub dataset did not give one split for split={split!r}")
    return loaded


def hub_unavailable() -> str | None:
    """Why the hub cannot be used now, or None; a short TCP probe so that no internet means an error, not a hang."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode ({variable}={os.environ[variable]})"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or ""
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=probe, daemon=True)  # daemon: a hung DNS lookup must not block exit
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    if not outcome:
        return f"{endpoint} did not answer within {HUB_PROBE_TIMEOUT_S:g} s (no internet?)"
    if outcome[0] is not None:
        return f"{endpoint} is unreachable ({outcome[0]})"
    return None


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _mixed_type_problems(table: dict[str, list[Any]], source: str) -> list[DataProblem]:
    """Name the cells whose type differs from their column's first non-null cell, else the column arrow rejects."""
    problems: list[DataProblem] = []
    for column, values in table.items():
        first: tuple[str, int] | None = None
        column_problems = []
        for row, value in enumerate(values, start=1):
            kind = _kind(value)
            if kind is None:
                continue
            if first is None:
                first = (kind, row)
            elif kind != first[0]:
                column_problems.append(
                    DataProblem(
                        source,
                        row,
                        column,
                        f"holds a {kind}, but row {first[1]} holds a {first[0]}; a column must hold one type",
                    )
                )
        if not column_problems:
            try:
                pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                column_problems.append(DataProblem(source, None, column, f"values do not share one type: {error}"))
        problems.extend(column_problems)
    return problems
