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
- One process per part at a time: a lock file `.lock-IIIII-of-NNNNN` per part, taken with `filelock` (see "Locks"
  below), removed when the writer closes the store.
- `overwrite=True` deletes other parts only while holding their locks: a part still being written (by any process,
  with any `num_parts`) makes the overwrite fail with an error naming that part; it is never deleted under a writer.
- An OS error while writing a shard or manifest (e.g. ENOSPC) is re-raised naming the file, the shard and the part,
  after removing the temp file; the committed state is the last manifest, as after a crash.

Locks (`lock_kind`, or the environment variable ALIGN_DISTILL_STORE_LOCK; default "flock"):
- "flock": `filelock.FileLock`, an OS advisory lock (flock), released by the OS when the process dies, even on
  SIGKILL; a leftover lock file after a crash is harmless. Falls back to a soft lock on filesystems without flock
  (ENOSYS). Use it on local disks and on shared filesystems whose flock is coherent across nodes (NFSv4, Lustre
  mounted with `-o flock`, GPFS).
- "soft": `filelock.SoftFileLock`, the lock file's existence (created exclusively, holding pid and host). Works on
  any shared filesystem, but a process killed without cleanup leaves a stale lock file: a writer on the same host
  reclaims it when that pid is dead; from another node it is reported as held, and must be deleted by hand once
  no writer of that part runs. Use it where flock is node-local (Lustre `-o localflock`, NFS `local_lock=flock`)
  and silently fails to exclude writers on other nodes.

The read side of the format (recognising a store, reading its committed shards in order) is
`align_distill.data.stores`, shared with `load_rows`, `data validate` and the trainers.

Failed rows (`failed_column`, e.g. the `sample` job's `error`): an input that failed for good is committed as a row
whose failed column holds the reason, so that a rerun does not stop on it again; each shard counts its failed rows
(`num_failed`) and readers skip them. `replace` commits new rows for failed inputs in their place (`retry_failed`):
every shard holding one of them is rewritten to a new file with the new rows where the old ones were, and one
manifest write swaps the files, so a crash leaves either the old rows or the new ones, never both; the old files
are then deleted (or, after a crash, removed as orphans on the next open).

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
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, SoftFileLock, Timeout

from align_distill.data.stores import (
    DATA_DIR,
    FORMAT,
    INPUT_INDEX,
    VERSION,
    StoreError,
    count_failed,
    decode_schema,
    manifest_name,
    read_manifest,
    read_manifests,
    read_store,
    store_files,
    store_summary,
)

LOCK_KINDS = ("flock", "soft")
LOCK_KIND_ENV = "ALIGN_DISTILL_STORE_LOCK"
"""Environment variable giving the default `lock_kind` ("flock" or "soft") of every store opened for writing."""

_LOCK_RE = re.compile(r"^\.lock-(\d{5})-of-(\d{5})$")
_PART_FILE_RE = re.compile(r"^\.?part-(\d{5})-of-(\d{5})-shard-")

__all__ = [
    "DATA_DIR",
    "FORMAT",
    "INPUT_INDEX",
    "LOCK_KINDS",
    "VERSION",
    "FingerprintMismatch",
    "ShardedStore",
    "StoreError",
    "atomic_write_bytes",
    "describe_mismatch",
    "fingerprint_digest",
    "load_store",
    "manifest_name",
    "part_range",
    "read_manifests",
    "store_files",
    "store_metadata",
    "store_summary",
]


class FingerprintMismatch(StoreError):
    """The store holds the output of a different job (other model, data, sampling, ...)."""


def part_range(num_inputs: int, part: int, num_parts: int) -> range:
    """Input positions owned by `part` of `num_parts`: a contiguous slice, sizes differing by at most one."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"part must be in [0, num_parts); got part={part}, num_parts={num_parts}")
    return range(part * num_inputs // num_parts, (part + 1) * num_inputs // num_parts)


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` to `path` through a temp file + fsync + rename, so a reader never sees a partial file.
    `sync_dir` also makes the rename itself survive a power loss."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def _located(error: OSError, path: Path, what: str) -> OSError:
    """`error` re-raised as the same kind of OSError whose message names the file and what was being written:
    `[Errno 28] No space left on device: out/data/x.parquet while writing shard 3 of part 0`."""
    reason = error.strerror or str(error)
    message = f"{reason}: {path} while writing {what}"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)  # OSError picks the subclass


def resolve_lock_kind(lock_kind: str | None = None) -> str:
    """`lock_kind`, else $ALIGN_DISTILL_STORE_LOCK, else "flock"; checked against LOCK_KINDS."""
    kind = lock_kind or os.environ.get(LOCK_KIND_ENV) or "flock"
    if kind not in LOCK_KINDS:
        source = "lock_kind" if lock_kind else LOCK_KIND_ENV
        raise ValueError(f"{source} must be one of {', '.join(LOCK_KINDS)}; got {kind!r}")
    return kind


def lock_name(part: int, num_parts: int) -> str:
    return f".lock-{part:05d}-of-{num_parts:05d}"


class PartLock:
    """The lock of one part of a store (`.lock-IIIII-of-NNNNN` in the store folder), taken without waiting."""

    def __init__(self, folder: Path, part: int, num_parts: int, kind: str):
        self.path = folder / lock_name(part, num_parts)
        self.part, self.num_parts, self.kind = part, num_parts, kind
        lock_class = SoftFileLock if kind == "soft" else FileLock
        self._lock = lock_class(str(self.path), timeout=0, thread_local=False)

    def acquire(self) -> None:
        """Take the lock, or raise StoreError saying the part is being written (or its soft lock is stale)."""
        try:
            self._lock.acquire()
        except Timeout as error:
            stale = (
                f" If no process writes this part any more (a writer killed while holding a soft lock), delete "
                f"{self.path} and retry."
                if self.kind == "soft"
                else ""
            )
            raise StoreError(
                f"{self.path.parent}: part {self.part} of {self.num_parts} is being written by another process "
                f"(lock {self.path.name} held: {error}); run each part once at a time.{stale}"
            ) from None

    def release(self) -> None:
        """Release the lock and remove its file. A flock file is unlinked while still held, so a process that
        opened the old file cannot lock it after us (filelock re-checks the link count after locking)."""
        if not self._lock.is_locked:
            return
        if self.kind == "flock":
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._lock.release(force=True)


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
        lock_kind: str | None = None,
        failed_column: str | None = None,
    ):
        part_range(0, part, num_parts)  # validates part / num_parts
        self.lock_kind = resolve_lock_kind(lock_kind)
        self.path = Path(path)
        self.part, self.num_parts = part, num_parts
        self.fingerprint = fingerprint
        self.failed_column = failed_column
        self.digest = fingerprint_digest(fingerprint)
        self.prefix = f"part-{part:05d}-of-{num_parts:05d}-shard-"
        self.manifest_path = self.path / manifest_name(part, num_parts)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / DATA_DIR).mkdir(exist_ok=True)
        self._lock = PartLock(self.path, part, num_parts, self.lock_kind)
        self._lock.acquire()
        try:
            self._open(overwrite, metadata or {}, list(order_by))
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------------------------
    def _open(self, overwrite: bool, metadata: dict[str, Any], order_by: list[str]) -> None:
        others = [m for m in read_manifests(self.path, strict=False) if m["_file"] != self.manifest_path.name]
        mine = read_manifest(self.manifest_path) if self.manifest_path.exists() else None
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
            self._overwrite(others, stale)
            if mine is not None:
                self._remove_part(self.part, self.num_parts)
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
        if self.failed_column is not None:
            self.manifest["failed_column"] = self.failed_column
        self._check_shards()
        self._remove_orphans()
        self._done = {
            i for shard in self.manifest["shards"] for start, stop in shard["inputs"] for i in range(start, stop)
        }

    def _overwrite(self, others: list[dict[str, Any]], stale: list[dict[str, Any]]) -> None:
        """Delete the other parts that `overwrite` discards, each under its own lock: every part laid out with
        another `num_parts` (found by its manifest, shard, temp or lock files), and parts of this layout whose
        manifest holds another job. Parts of this layout and job (siblings of a multi-node run) are left alone.
        If any of these parts is locked, nothing is deleted and StoreError names it."""
        doomed = {(m["part"], m["num_parts"]) for m in stale if m["_file"] != self.manifest_path.name}
        found = {(m["part"], m["num_parts"]) for m in others}
        for folder, pattern in ((self.path, _LOCK_RE), (self.path / DATA_DIR, _PART_FILE_RE)):
            for file in folder.iterdir():
                match = pattern.match(file.name)
                if match:
                    found.add((int(match.group(1)), int(match.group(2))))
        doomed |= {(part, num_parts) for part, num_parts in found if num_parts != self.num_parts}
        doomed.discard((self.part, self.num_parts))
        held: list[PartLock] = []
        try:
            for part, num_parts in sorted(doomed):
                lock = PartLock(self.path, part, num_parts, self.lock_kind)
                try:
                    lock.acquire()
                except StoreError as error:
                    raise StoreError(f"cannot overwrite: {error}") from None
                held.append(lock)
            for part, num_parts in sorted(doomed):
                self._remove_part(part, num_parts)
        finally:
            for lock in held:
                lock.release()

    def _remove_part(self, part: int, num_parts: int) -> None:
        """Delete a part's shards (also orphans and temp files of that part) and then its manifest; the caller
        holds the part's lock."""
        prefix = f"part-{part:05d}-of-{num_parts:05d}-shard-"
        data = self.path / DATA_DIR
        for file in [*data.glob(f"{prefix}*.parquet"), *data.glob(f".{prefix}*.tmp-*")]:
            file.unlink(missing_ok=True)
        manifest = self.path / manifest_name(part, num_parts)
        for file in [manifest, *self.path.glob(f".{manifest.name}.tmp-*")]:
            file.unlink(missing_ok=True)

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

    @property
    def num_failed(self) -> int:
        """Failed rows this part holds (see the module docstring)."""
        return count_failed([self.manifest])

    def failed_inputs(self) -> list[int]:
        """Input positions (sorted) whose committed rows failed: what `retry_failed` asks for again."""
        if self.failed_column is None:
            return []
        found: set[int] = set()
        for shard in self.manifest["shards"]:
            if shard.get("num_failed") and shard["file"]:
                table = pq.read_table(self.path / shard["file"], columns=[INPUT_INDEX, self.failed_column])
                failed = table.column(self.failed_column).is_valid().to_pylist()
                found.update(i for i, bad in zip(table.column(INPUT_INDEX).to_pylist(), failed) if bad)
        return sorted(found)

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
        what = f"shard {index} of part {self.part}"
        final: Path | None = None
        if rows:  # inputs that yield no rows are committed by the manifest alone
            final = self._write_shard(self._to_table(rows, column_types or {}), what)
            entry.update(self._shard_entry(final, rows))
        self.manifest["shards"].append(entry)
        try:
            self._write_manifest(what)  # the commit point
        except OSError:
            self.manifest["shards"].pop()
            if final is not None:
                _discard(final)  # never listed: its inputs stay pending
            raise
        self._done.update(inputs)
        return self.path / entry["file"] if entry["file"] else None

    def replace(
        self,
        rows: list[dict[str, Any]],
        inputs: Sequence[int],
        column_types: dict[str, pa.DataType] | None = None,
    ) -> None:
        """Commit `rows` as the new output of `inputs`, committed inputs whose rows failed (`failed_inputs`), in
        place of their old rows: exactly once, with one manifest write (see the module docstring)."""
        inputs = list(inputs)
        targets = set(inputs)
        if len(targets) != len(inputs):
            raise StoreError(f"{self.path}: inputs {inputs} would be written twice")
        not_failed = sorted(targets - set(self.failed_inputs()))
        if not_failed:
            raise StoreError(f"{self.path}: inputs {not_failed[:5]} are not failed inputs of part {self.part}")
        stray = [row.get(INPUT_INDEX) for row in rows if row.get(INPUT_INDEX) not in targets]
        if stray:
            raise StoreError(f"rows with {INPUT_INDEX} {stray[:5]} do not belong to the inputs being replaced")
        new_rows: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            new_rows.setdefault(row[INPUT_INDEX], []).append(row)
        shards = self.manifest["shards"]
        before = [dict(shard) for shard in shards]
        written: list[Path] = []
        try:
            for index, shard in enumerate(shards):
                if not shard["file"] or not any(start <= i < stop for start, stop in shard["inputs"] for i in targets):
                    continue
                kept: list[dict[str, Any]] = []
                placed: set[int] = set()
                for row in pq.read_table(self.path / shard["file"]).to_pylist():
                    position = row[INPUT_INDEX]
                    if position not in targets:
                        kept.append(row)
                    elif position not in placed:  # the new rows where the input's old rows were
                        kept.extend(new_rows.get(position, []))
                        placed.add(position)
                what = f"shard {index} of part {self.part} (replacing failed rows)"
                if kept:
                    final = self._write_shard(self._to_table(kept, column_types or {}), what)
                    written.append(final)
                    shard.update(self._shard_entry(final, kept))
                else:  # every row of the shard was replaced by none: its inputs stay committed, without rows
                    for key in ("first_id", "last_id", "bytes", "num_failed"):
                        shard.pop(key, None)
                    shard.update(file=None, num_rows=0)
            self._write_manifest(f"the replacement of failed rows of part {self.part}")  # the commit point
        except BaseException:
            shards[:] = before
            for file in written:
                _discard(file)  # never listed: the failed rows stay, and are retried again
            raise
        listed = {shard["file"] for shard in shards}
        for old in before:
            if old["file"] and old["file"] not in listed:
                _discard(self.path / old["file"])  # unlisted; after a crash before this, an orphan removed on open

    def _write_shard(self, table: pa.Table, what: str) -> Path:
        """Write `table` as this part's next shard file (temp + fsync + rename + directory fsync); not yet listed."""
        number = int(self.manifest.get("next_file", len(self.manifest["shards"])))
        self.manifest["next_file"] = number + 1  # file names are never reused within a manifest
        name = f"{self.prefix}{number:05d}.parquet"
        final = self.path / DATA_DIR / name
        tmp = final.parent / f".{name}.tmp-{os.getpid()}"
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as error:
            _discard(tmp)
            _discard(final)  # renamed but not committed: an orphan
            raise _located(error, final, what) from error
        return final

    def _shard_entry(self, file: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The manifest fields describing a written shard file of `rows`."""
        entry: dict[str, Any] = {
            "file": f"{DATA_DIR}/{file.name}",
            "num_rows": len(rows),
            "first_id": rows[0].get("id"),
            "last_id": rows[-1].get("id"),
            "bytes": file.stat().st_size,
        }
        if self.failed_column is not None:
            entry["num_failed"] = sum(row.get(self.failed_column) is not None for row in rows)
        return entry

    def _to_table(self, rows: list[dict[str, Any]], column_types: dict[str, pa.DataType]) -> pa.Table:
        recorded = self.manifest["schema"]
        if recorded is not None:
            schema = _decode_schema(recorded)
            column = self.failed_column
            if column is not None and column not in schema.names and any(r.get(column) is not None for r in rows):
                raise StoreError(
                    f"{self.manifest_path}: this store was started by an older align-distill without a `{column}` "
                    "column, so a failed row cannot be recorded in it; finish it in a new output_dir (or --overwrite)"
                )
            return pa.Table.from_pylist(rows, schema=schema)
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
        try:
            self._write_manifest(f"the completion of part {self.part}")
        except OSError:
            self.manifest["complete"] = False
            raise

    def _write_manifest(self, what: str) -> None:
        # No directory fsync: if a power loss undoes this rename, the older manifest is still a consistent state
        # (the newest shard becomes an orphan and is redone). Shard renames are synced before the manifest lists them.
        data = json.dumps(self.manifest, indent=1, default=str).encode()
        try:
            atomic_write_bytes(self.manifest_path, data, False)
        except OSError as error:
            raise _located(error, self.manifest_path, f"the manifest for {what}") from error

    def close(self) -> None:
        """Release the part's lock and remove the lock file."""
        self._lock.release()

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _discard(file: Path) -> None:
    with contextlib.suppress(OSError):
        file.unlink(missing_ok=True)


def _encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


_decode_schema = decode_schema


def store_metadata(path: str | Path) -> dict[str, Any]:
    """The job metadata recorded in the store's manifest (e.g. the signals encoding)."""
    return read_manifests(path)[0]["metadata"]


def load_store(
    path: str | Path, allow_partial: bool = False, cache_dir: str | None = None, include_failed: bool = False
) -> datasets.Dataset:
    """The store's rows as a `datasets.Dataset` in input order (stable within an input), read with
    `datasets.load_dataset("parquet", ...)` so the shards stay memory-mapped (`align_distill.data.stores`).
    Failed rows are skipped (and counted in a warning) unless `include_failed`."""
    return read_store(path, allow_partial, cache_dir, include_failed)
