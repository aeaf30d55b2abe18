"""Reading the sharded stores that `align-distill generate` writes (the writer is `align_distill.data_gen.store`).

A store folder is recognised by its manifest file(s): `manifest.json` (one part) or `manifest-IIIII-of-NNNNN.json`
(part I of N), JSON objects with `"format": "align-distill-store"`. Each manifest lists its part's committed
shards (`data/*.parquet`) in commit order; the manifests are the commit point, so only the shards they list are
read (a shard a crashed job renamed but never committed is ignored). The rows come back in input order: the shards
are concatenated part by part and sorted, stably, by the manifest's `order_by` columns (`input_index` first).

This is the one reader of the format: `load_rows`, `align-distill data validate`, the trainers' dataset loading and
`align_distill.data_gen.load_store` all read stores through `read_store`.

Failed rows: a job whose manifest names a `failed_column` (`sample` / `rollout`: `error`) commits an input that failed
for good (e.g. a prompt an OpenAI-compatible server refused) as a row with that column set to the reason, and counts
them per shard (`num_failed`). `read_store` leaves those rows out, and the column with them (null in every row
left), and logs how many it skipped, so they never become training rows or the input of the next job;
`include_failed=True` returns them and the column too (what `retry_failed` retries).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

FORMAT = "align-distill-store"
VERSION = 1
DATA_DIR = "data"
INPUT_INDEX = "input_index"
"""Column every store row carries: the position of the input row it came from (sort key of `read_store`)."""

logger = logging.getLogger("align_distill.data")

MANIFEST_RE = re.compile(r"^manifest(?:-(\d{5})-of-(\d{5}))?\.json$")


class StoreError(RuntimeError):
    """The store folder is missing, damaged, incomplete or locked."""


def manifest_name(part: int, num_parts: int) -> str:
    return "manifest.json" if num_parts == 1 else f"manifest-{part:05d}-of-{num_parts:05d}.json"


def is_store(path: str | Path) -> bool:
    """Whether `path` is a store folder: a folder holding at least one manifest file."""
    folder = Path(path)
    return folder.is_dir() and any(MANIFEST_RE.match(f.name) for f in folder.iterdir())


def decode_schema(encoded: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))


def read_manifest(file: Path) -> dict[str, Any]:
    """One part's manifest, with its file name under `_file`."""
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(f"{file}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{file}: not an align-distill store manifest (format {found!r})")
    manifest["_file"] = file.name
    return manifest


def read_manifests(path: str | Path, strict: bool = True) -> list[dict[str, Any]]:
    """All part manifests of the store at `path` (each with its file name under `_file`)."""
    folder = Path(path)
    if not folder.is_dir():
        if strict:
            raise StoreError(f"{folder}: no such store folder")
        return []
    files = sorted(f for f in folder.iterdir() if MANIFEST_RE.match(f.name))
    if strict and not files:
        raise StoreError(f"{folder}: no manifest.json (not a store, or no shard of it has finished yet)")
    return [read_manifest(file) for file in files]


def store_files(path: str | Path, allow_partial: bool = False) -> tuple[list[Path], list[dict[str, Any]]]:
    """The committed shard files of a store (parts in order, shards in commit order) and its manifests.

    Raises StoreError when parts disagree, a part is missing or (unless `allow_partial`) unfinished.
    """
    folder = Path(path)
    manifests = read_manifests(folder)
    digests = {m.get("fingerprint_sha256") for m in manifests}
    counts = {m.get("num_parts") for m in manifests}
    if len(digests) > 1 or len(counts) > 1:
        raise StoreError(f"{folder}: manifests of different jobs are mixed: {[m['_file'] for m in manifests]}")
    num_parts = counts.pop()
    missing = sorted(set(range(num_parts)) - {m["part"] for m in manifests})
    unfinished = [m["_file"] for m in manifests if not m["complete"]]
    if not allow_partial and (missing or unfinished):
        problems = [f"parts {missing} of {num_parts} have no manifest"] if missing else []
        problems += [f"{', '.join(unfinished)} not finished (rerun the job to resume)"] if unfinished else []
        raise StoreError(f"{folder}: incomplete store: {'; '.join(problems)} (allow_partial=True loads what is there)")
    manifests.sort(key=lambda m: m["part"])
    files = [folder / shard["file"] for m in manifests for shard in m["shards"] if shard["file"]]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise StoreError(
            f"{folder}: the manifests list {len(absent)} shard file(s) that are missing, e.g. {absent[0]}; "
            "the store was damaged (rerun the job with --overwrite to regenerate it)"
        )
    return files, manifests


def read_store(
    path: str | Path, allow_partial: bool = False, cache_dir: str | None = None, include_failed: bool = False
) -> datasets.Dataset:
    """The store's rows as a `datasets.Dataset` in input order (stable within an input): exactly the rows of the
    shards its manifests list, read with `datasets.load_dataset("parquet", ...)` so the shards stay memory-mapped.

    Failed rows (see the module docstring) and their marker column are left out, and their number logged, unless
    `include_failed`: a row whose generation failed is no data to train on."""
    files, manifests = store_files(path, allow_partial)
    order_by = manifests[0].get("order_by", [INPUT_INDEX])
    failed_column = manifests[0].get("failed_column")
    # once failed rows are skipped their column is null in every row: a marker, not data, so it goes too
    drop = [failed_column] if failed_column and not include_failed else []
    if not files:
        schemas = [decode_schema(m["schema"]) for m in manifests if m.get("schema")]
        empty = schemas[0].empty_table() if schemas else pa.table({INPUT_INDEX: pa.array([], pa.int64())})
        return datasets.Dataset(empty.drop_columns([c for c in drop if c in empty.column_names]))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars for a local read are noise
    try:
        loaded = datasets.load_dataset(
            "parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
        )
    finally:
        if bars:
            datasets.enable_progress_bars()
    keys = [np.asarray(loaded.data.column(column).to_numpy()) for column in order_by]
    order = np.lexsort(keys[::-1])  # stable: rows of one input keep their order
    failed = count_failed(manifests)
    if failed and drop and failed_column in loaded.column_names:
        good = np.asarray(loaded.data.column(failed_column).is_null().to_numpy(zero_copy_only=False))
        order = order[good[order]]
        logger.warning(
            "%s: skipped %d failed row%s (the job could not generate them; rerun it with retry_failed: true to "
            "try again)",
            path,
            failed,
            "" if failed == 1 else "s",
        )
    if not np.array_equal(order, np.arange(len(loaded))):
        loaded = loaded.select(order.tolist())
    drop = [c for c in drop if c in loaded.column_names]
    return loaded.remove_columns(drop) if drop else loaded


def count_failed(manifests: list[dict[str, Any]]) -> int:
    """Failed rows the manifests' shards hold (0 for stores of jobs without failed rows)."""
    return sum(int(shard.get("num_failed") or 0) for m in manifests for shard in m["shards"])


def store_summary(path: str | Path) -> dict[str, Any]:
    """The job's summary from its manifests alone: rows committed (failed ones included), failed rows, inputs
    done, and whether every part is complete."""
    manifests = read_manifests(path)
    return {
        "rows": sum(int(shard.get("num_rows") or 0) for m in manifests for shard in m["shards"]),
        "failed": count_failed(manifests),
        "inputs": sum(int(shard.get("num_inputs") or 0) for m in manifests for shard in m["shards"]),
        "complete": all(m.get("complete") for m in manifests) and len(manifests) == manifests[0]["num_parts"],
    }
