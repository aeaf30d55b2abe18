"""The sharded, resumable output store of every data-generation job.

Layout of a store folder (one job's output):

    manifest.json                               single-part store; with `num_parts` = N > 1, one manifest per
    manifest-00002-of-00004.json                part (`part-I-of-N`), so nodes never write the same file
    data/part-00000-of-00001-shard-00000.parquet

Exactly-once, by construction:
- A shard is written to a hidden temp name, fsynced and renamed (atomic on POSIX); only then is the manifest
  rewritten (temp + rename) to list it. The manifest is the commit point: a shard not listed is an orphan from a
  crash between the two renames, and is deleted when the part is reopened; its inputs are still pending.
- Each job processes its inputs in input order and commits whole inputs, so the inputs of a part that are done are
  exactly those in its manifest, and a rerun skips them: no input row lost, none duplicated.
- The manifest records the job fingerprint; reopening with a different one is an error unless `overwrite=True`.
- One process per part at a time: an advisory lock (released by the OS when the process dies, even on SIGKILL).

Parts: part I of N owns the contiguous range of input positions `[I·M // N, (I+1)·M // N)` for M input rows (see
`part_range`); contiguous, so each part's output is one run of the input order and the parts' shards merge by a
sort on `input_index`. No merge step: `load_store` reads every part's manifest.

The manifest keeps, per shard, its file, row count, byte size and the input positions it completed as runs
`[[start, stop), ...]` (plus first/last row id), not every id, so that rewriting it after each shard stays cheap
for millions of rows. Shards are plain parquet: `datasets.load_dataset("parquet", data_files="out/data/*.parquet")`
reads a finished store directly (after a crash, until the job is resumed, the folder may hold one orphan shard
that the manifest does not list: `load_store` reads only listed shards).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "align-distill-store"
VERSION = 1
DATA_DIR = "data"
INPUT_INDEX = "input_index"
"""Column every output row carries: the position of the input row it came from (sort key of `load_store`)."""

_MANIFEST_RE = re.compile(r"^manifest(?:-(\d{5})-of-(\d{5}))?\.json$")


class StoreError(RuntimeError):
    """The store folder is missing, damaged, incomplete or locked."""


class FingerprintMismatch(StoreError):
    """The store holds the output of a different job (other model, data, sampling, ...)."""


def part_range(num_inputs: int, part: int, num_parts: int) -> range:
    """Input positions owned by `part` of `num_parts`: a contiguous slice, sizes differing by at most one."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"part must be in [0, num_parts); got part={part}, num_parts={num_parts}")
    return range(part * num_inputs // num_parts, (part + 1) * num_inputs // num_parts)


def manifest_name(part: int, num_parts: int) -> str:
    return "manifest.json" if num_parts == 1 else f"manifest-{part:05d}-of-{num_parts:05d}.json"


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` to `path` through a temp file + fsync + rename, so a reader never sees a partial file.
    `sync_dir` also makes the rename itself survive a power loss."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _runs(positions: Sequence[int]) -> list[list[int]]:
    """Sorted positions as half-open runs: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    runs: list[list[int]] = []
    for position in sorted(positions):
        if runs and runs[-1][1] == position:
            runs[-1][1] = position + 1
        else:
            runs.append([position, position + 1])
    return runs


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def describe_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """The keys whose values differ, as 'key: stored X, now Y' lines (at most 10)."""
    old, new = _flatten(stored), _flatten(current)
    lines = [
        f"  {key}: stored {old.get(key, '(absent)')!r}, now {new.get(key, '(absent)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
    return "\n".join(lines[:10]) + more


class ShardedStore:
    """One part of a store, open for writing. Use as a context manager (holds the part's lock)."""

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        *,
        part: int = 0,
        num_parts: int = 1,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
        order_by: Sequence[str] = (INPUT_INDEX,),
    ):
        part_range(0, part, num_parts)  # validates part / num_parts
        self.path = Path(path)
        self.part, self.num_parts = part, num_parts
        self.fingerprint = fingerprint
        self.digest = fingerprint_digest(fingerprint)
        self.prefix = f"part-{part:05d}-of-{num_parts:05d}-shard-"
        self.manifest_path = self.path / manifest_name(part, num_parts)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / DATA_DIR).mkdir(exist_ok=True)
        self._lock = open(self.path / f".lock-{part:05d}-of-{num_parts:05d}", "w")  # noqa: SIM115 - held open
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreError(
                f"{self.path}: part {part} of {num_parts} is being written by another process (lock held); "
                "run each part once at a time"
            ) from None
        try:
            self._open(overwrite, metadata or {}, list(order_by))
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------------------------
    def _open(self, overwrite: bool, metadata: dict[str, Any], order_by: list[str]) -> None:
        others = [m for m in read_manifests(self.path, strict=False) if m["_file"] != self.manifest_path.name]
        mine = _read_manifest(self.manifest_path) if self.manifest_path.exists() else None
        stale = [m for m in others if m.get("fingerprint_sha256") != self.digest or m["num_parts"] != self.num_parts]
        if mine is not None and mine.get("fingerprint_sha256") != self.digest:
            stale.append(mine)
        if stale and not overwrite:
            found = stale[0]
            raise FingerprintMismatch(
                f"{self.path / found['_file']}: this store was made by a different {found.get('job', '?')} job "
                f"(or with num_parts={found['num_parts']}, now {self.num_parts}):\n"
                f"{describe_mismatch(found.get('fingerprint', {}), self.fingerprint)}\n"
                "Pass overwrite=True (--overwrite) to discard it, or write to another output folder."
            )
        if overwrite:
            for manifest in stale + ([mine] if mine is not None else []):
                self._remove_part(manifest)
            mine = None
        self.manifest = mine or {
            "format": FORMAT,
            "version": VERSION,
            "job": self.fingerprint.get("job"),
            "fingerprint": self.fingerprint,
            "fingerprint_sha256": self.digest,
            "part": self.part,
            "num_parts": self.num_parts,
            "num_inputs": None,
            "complete": False,
            "order_by": order_by,
            "metadata": metadata,
            "schema": None,
            "shards": [],
        }
        self.manifest.pop("_file", None)
        self._check_shards()
        self._remove_orphans()
        self._done = {
            i for shard in self.manifest["shards"] for start, stop in shard["inputs"] for i in range(start, stop)
        }

    def _remove_part(self, manifest: dict[str, Any]) -> None:
        """Delete a part's shards (also orphans of that part) and then its manifest."""
        prefix = f"part-{manifest['part']:05d}-of-{manifest['num_parts']:05d}-shard-"
        for file in (self.path / DATA_DIR).glob(f"{prefix}*.parquet"):
            file.unlink()
        (self.path / manifest["_file"]).unlink(missing_ok=True)

    def _check_shards(self) -> None:
        for shard in self.manifest["shards"]:
            if shard["file"] is None:
                continue
            file = self.path / shard["file"]
            if not file.is_file():
                raise StoreError(f"{self.manifest_path}: lists shard {shard['file']}, but the file is missing")
            if file.stat().st_size != shard["bytes"]:
                raise StoreError(
                    f"{file}: expected {shard['bytes']} bytes (as recorded in {self.manifest_path.name}), "
                    f"found {file.stat().st_size}; the shard was modified after it was written"
                )

    def _remove_orphans(self) -> None:
        listed = {Path(shard["file"]).name for shard in self.manifest["shards"] if shard["file"]}
        data = self.path / DATA_DIR
        for file in data.glob(f"{self.prefix}*.parquet"):
            if file.name not in listed:
                file.unlink()  # renamed but never committed: its inputs are still pending
        for file in data.glob(f".{self.prefix}*.tmp-*"):
            file.unlink()
        for file in self.path.glob(f".{self.manifest_path.name}.tmp-*"):
            file.unlink()

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def done(self) -> set[int]:
        """Input positions whose output rows are committed."""
        return set(self._done)

    def pending(self, positions: Iterable[int]) -> list[int]:
        return [i for i in positions if i not in self._done]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest["metadata"]

    def set_num_inputs(self, num_inputs: int) -> None:
        """Record how many inputs this part owns (so `load_store` can tell a finished store from a partial one)."""
        if self.manifest["num_inputs"] not in (None, num_inputs):
            raise StoreError(
                f"{self.manifest_path}: part owned {self.manifest['num_inputs']} inputs, now {num_inputs}, "
                "with the same fingerprint; the input data changed without changing its hash"
            )
        self.manifest["num_inputs"] = num_inputs

    # -- writing ------------------------------------------------------------------------------------------------
    def append(
        self,
        rows: list[dict[str, Any]],
        inputs: Sequence[int],
        column_types: dict[str, pa.DataType] | None = None,
    ) -> Path | None:
        """Commit one shard: `rows` (each with `input_index` among `inputs`) complete exactly the inputs `inputs`
        (an input may yield several rows, or none). The first shard's schema (inferred, with `column_types` for the
        columns named there) is recorded and every later shard is built with it, so all shards concatenate."""
        inputs = list(inputs)
        repeated = sorted(set(inputs) & self._done)
        if repeated or len(set(inputs)) != len(inputs):
            raise StoreError(f"{self.path}: inputs {repeated or inputs} would be written twice")
        allowed = set(inputs)
        stray = [row.get(INPUT_INDEX) for row in rows if row.get(INPUT_INDEX) not in allowed]
        if stray:
            raise StoreError(f"rows with {INPUT_INDEX} {stray[:5]} do not belong to the inputs of this shard")
        index = len(self.manifest["shards"])
        entry: dict[str, Any] = {"file": None, "num_rows": 0, "num_inputs": len(inputs), "inputs": _runs(inputs)}
        if rows:  # inputs that yield no rows are committed by the manifest alone
            table = self._to_table(rows, column_types or {})
            name = f"{self.prefix}{index:05d}.parquet"
            final = self.path / DATA_DIR / name
            tmp = final.parent / f".{name}.tmp-{os.getpid()}"
            pq.write_table(table, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            entry.update(
                file=f"{DATA_DIR}/{name}",
                num_rows=table.num_rows,
                first_id=rows[0].get("id"),
                last_id=rows[-1].get("id"),
                bytes=final.stat().st_size,
            )
        self.manifest["shards"].append(entry)
        self._write_manifest()  # the commit point
        self._done.update(inputs)
        return self.path / entry["file"] if entry["file"] else None

    def _to_table(self, rows: list[dict[str, Any]], column_types: dict[str, pa.DataType]) -> pa.Table:
        recorded = self.manifest["schema"]
        if recorded is not None:
            return pa.Table.from_pylist(rows, schema=_decode_schema(recorded))
        inferred = pa.Table.from_pylist(rows).schema
        fields = [pa.field(f.name, column_types.get(f.name, f.type)) for f in inferred]
        untyped = [f.name for f in fields if pa.types.is_null(f.type)]
        if untyped:
            raise StoreError(f"columns {untyped} hold only nulls in the first shard; declare their types")
        table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
        self.manifest["schema"] = _encode_schema(table.schema)
        return table

    def finish(self) -> None:
        """Mark the part complete once every owned input is done."""
        owned = self.manifest["num_inputs"]
        if owned is None or len(self._done) != owned:
            raise StoreError(f"{self.manifest_path}: {len(self._done)} of {owned} inputs done; cannot finish")
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        # No directory fsync: if a power loss undoes this rename, the older manifest is still a consistent state
        # (the newest shard becomes an orphan and is redone). Shard renames are synced before the manifest lists them.
        atomic_write_bytes(self.manifest_path, json.dumps(self.manifest, indent=1, default=str).encode(), False)

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _decode_schema(encoded: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))


def _read_manifest(file: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(f"{file}: unreadable manifest ({error})") from None
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{file}: not an align-distill store manifest (format {manifest.get('format')!r})")
    manifest["_file"] = file.name
    return manifest


def read_manifests(path: str | Path, strict: bool = True) -> list[dict[str, Any]]:
    """All part manifests of the store at `path` (each with its file name under `_file`)."""
    folder = Path(path)
    if not folder.is_dir():
        if strict:
            raise StoreError(f"{folder}: no such store folder")
        return []
    files = sorted(f for f in folder.iterdir() if _MANIFEST_RE.match(f.name))
    if strict and not files:
        raise StoreError(f"{folder}: no manifest.json (not a store, or no shard of it has finished yet)")
    return [_read_manifest(file) for file in files]


def store_files(path: str | Path, allow_partial: bool = False) -> tuple[list[Path], list[dict[str, Any]]]:
    """The committed shard files of a store (parts in order, shards in commit order) and its manifests.

    Raises StoreError when parts disagree, a part is missing or (unless `allow_partial`) unfinished.
    """
    folder = Path(path)
    manifests = read_manifests(folder)
    digests = {m["fingerprint_sha256"] for m in manifests}
    counts = {m["num_parts"] for m in manifests}
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
    return files, manifests


def store_metadata(path: str | Path) -> dict[str, Any]:
    """The job metadata recorded in the store's manifest (e.g. the signals encoding)."""
    return read_manifests(path)[0]["metadata"]


def load_store(path: str | Path, allow_partial: bool = False, cache_dir: str | None = None) -> datasets.Dataset:
    """The store's rows as a `datasets.Dataset` in input order (stable within an input), read with
    `datasets.load_dataset("parquet", ...)` so the shards stay memory-mapped."""
    files, manifests = store_files(path, allow_partial)
    order_by = manifests[0].get("order_by", [INPUT_INDEX])
    if not files:
        schemas = [_decode_schema(m["schema"]) for m in manifests if m.get("schema")]
        empty = schemas[0].empty_table() if schemas else pa.table({INPUT_INDEX: pa.array([], pa.int64())})
        return datasets.Dataset(empty)
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
    if np.array_equal(order, np.arange(len(order))):
        return loaded
    return loaded.select(order.tolist())
