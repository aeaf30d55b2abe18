"""The loop every job shares: open the store, skip committed inputs, process the rest shard by shard in input
order, commit each shard, mark the part complete. A job only says how to turn a list of input rows into output
rows.

A job with a `failed_column` (`sample` / `rollout`) commits an input that failed for good as a failed row instead of
stopping, so a rerun does not stop on it again; with `retry_failed` (a job key) the failed inputs are processed again
first and their new rows replace the failed ones (`ShardedStore.replace`: exactly once)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from tqdm.auto import tqdm

from align_distill.data_gen.config import JobConfig
from align_distill.data_gen.store import INPUT_INDEX, ShardedStore, part_range

from .inputs import dataset_digest

logger = logging.getLogger("align_distill.data_gen")

Process = Callable[[list[int], list[dict[str, Any]]], list[dict[str, Any]]]
"""(input positions, input rows) -> output rows, each with `input_index` set to its input's position."""


def row_seed(seed: int, row_id: str) -> int:
    """A row's sampling seed from the job seed and the row id (not its position), so samples survive resumption,
    splitting into parts and reordering of the input."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def kept_types(inputs: datasets.Dataset, produced: set[str]) -> dict[str, pa.DataType]:
    """Arrow types of the input columns a job passes through (all but those it produces, except id and prompt),
    so they keep their types even in a shard where they hold only nulls."""
    return {f.name: f.type for f in inputs.data.schema if f.name not in produced or f.name in ("id", "prompt")}


def run_store_job(
    kind: str,
    config: JobConfig,
    inputs: datasets.Dataset,
    fingerprint: dict[str, Any],
    process: Process,
    *,
    column_types: dict[str, pa.DataType] | None = None,
    metadata: dict[str, Any] | None = None,
    order_by: tuple[str, ...] = (INPUT_INDEX,),
    count_tokens: Callable[[list[dict[str, Any]]], int] = lambda rows: 0,
    failed_column: str | None = None,
    prepare: Callable[[list[int], list[dict[str, Any]]], Any] | None = None,
) -> Path:
    """Run `process` over this part's pending inputs (and, with the config's `retry_failed`, its failed ones) and
    commit the rows; returns the store folder. `failed_column`: the column that marks a failed row (see the module
    docstring); the number of failed rows is logged at the end (`store_summary` reads it from the manifests).
    `prepare(positions, rows)`: CPU work of a shard that needs no model (e.g. tokenization), run one shard ahead in
    a thread while the previous shard is processed; `process` then gets its result instead of the rows. It only
    reads, so commits, their order and the exactly-once guarantee are unchanged; its errors surface in order."""
    fingerprint = {
        "job": kind,
        **fingerprint,
        "input": {"sha256": dataset_digest(inputs), "rows": len(inputs)},
        "num_parts": config.num_parts,
    }
    owned = part_range(len(inputs), config.part, config.num_parts)
    with ShardedStore(
        config.output_dir,
        fingerprint,
        part=config.part,
        num_parts=config.num_parts,
        overwrite=config.overwrite,
        metadata=metadata,
        order_by=order_by,
        lock_kind=getattr(config, "lock_kind", None),  # None: $ALIGN_DISTILL_STORE_LOCK, else flock
        failed_column=failed_column,
    ) as store:
        store.set_num_inputs(len(owned))
        pending = store.pending(owned)
        retry = store.failed_inputs() if getattr(config, "retry_failed", False) else []
        if retry:
            logger.info("%s: retrying the %d failed inputs of %s", kind, len(retry), config.output_dir)
        if len(pending) < len(owned):
            logger.info(
                "%s: resuming %s: %d of %d inputs already done",
                kind,
                config.output_dir,
                len(owned) - len(pending),
                len(owned),
            )
        started, tokens = time.perf_counter(), 0
        # One writer thread commits shard i (parquet encoding, fsync) while shard i+1 is computed; commits stay in
        # order and at most one is in flight, so a crash loses at most the shards not yet committed.
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as writer,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prepare") as preparer,
            tqdm(
                total=len(retry) + len(pending),
                desc=kind,
                unit="row",
                disable=progress_disabled(config.progress, retry + pending),
            ) as bar,
        ):
            in_flight: Future | None = None
            work = [(store.replace, retry), (store.append, pending)]
            chunks = [
                (commit, todo[i : i + config.shard_size])
                for commit, todo in work
                for i in range(0, len(todo), config.shard_size)
            ]

            table_view = inputs.with_format("arrow")  # rows by index without `select`'s fingerprint of each chunk

            def read(chunk: list[int]) -> Any:
                rows = table_view[chunk].to_pylist()
                return rows if prepare is None else prepare(chunk, rows)

            ahead = preparer.submit(read, chunks[0][1]) if chunks else None
            for i, (commit, chunk) in enumerate(chunks):
                current = ahead.result()
                ahead = preparer.submit(read, chunks[i + 1][1]) if i + 1 < len(chunks) else None
                rows = process(chunk, current)
                if in_flight is not None:
                    in_flight.result()  # re-raises a failed commit before more work is queued
                in_flight = writer.submit(commit, rows, chunk, column_types)
                tokens += count_tokens(rows)
                bar.update(len(chunk))
                if tokens:
                    bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
            if in_flight is not None:
                in_flight.result()
        store.finish()
        failed = store.num_failed
    if failed:
        logger.warning(
            "%s: %d row%s of %s failed for good (the `%s` column says why; readers skip them); rerun with "
            "retry_failed: true to generate them again",
            kind,
            failed,
            "" if failed == 1 else "s",
            config.output_dir,
            failed_column,
        )
    return Path(config.output_dir)


def progress_disabled(progress: bool, pending: list) -> bool | None:
    """tqdm's `disable`: off when asked or with nothing to do; None lets tqdm switch itself off when its output is not
    a terminal (CI logs, nohup), so the bar is on by default without filling logs with redraws."""
    return True if not progress or not pending else None
