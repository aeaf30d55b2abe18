"""The sharded store: round trip, atomic commits, crash leftovers, fingerprints, parts."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal

import datasets
import pytest

from align_distill.data_gen import store as store_module
from align_distill.data_gen.store import (
    FingerprintMismatch,
    ShardedStore,
    StoreError,
    load_store,
    part_range,
    read_manifests,
)

FP = {"job": "test", "model": "m", "sampling": {"temperature": 0.0}}


def rows_for(positions: list[int]) -> list[dict]:
    return [{"id": f"r{i}", "input_index": i, "text": f"row {i}", "ids": [i, i + 1]} for i in positions]


def write_all(path, positions, shard_size=3, fingerprint=FP, **kwargs) -> None:
    with ShardedStore(path, fingerprint, **kwargs) as store:
        store.set_num_inputs(len(positions))
        pending = store.pending(positions)
        for start in range(0, len(pending), shard_size):
            chunk = pending[start : start + shard_size]
            store.append(rows_for(chunk), chunk)
        store.finish()


def test_round_trip_in_input_order_and_plain_parquet(tmp_path):
    write_all(tmp_path / "s", list(range(10)))
    loaded = load_store(tmp_path / "s")
    assert loaded["id"] == [f"r{i}" for i in range(10)]
    assert loaded["ids"][3] == [3, 4]
    # the shards are plain parquet that `datasets` reads directly
    direct = datasets.load_dataset("parquet", data_files=str(tmp_path / "s" / "data" / "*.parquet"), split="train")
    assert sorted(direct["id"]) == sorted(loaded["id"])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and [s["inputs"] for s in manifest["shards"]][:2] == [[[0, 3]], [[3, 6]]]
    assert sum(s["num_rows"] for s in manifest["shards"]) == 10


def test_resume_skips_committed_inputs(tmp_path):
    path = tmp_path / "s"
    with ShardedStore(path, FP) as store:
        store.set_num_inputs(10)
        store.append(rows_for([0, 1, 2]), [0, 1, 2])
    with ShardedStore(path, FP) as store:
        assert store.pending(range(10)) == list(range(3, 10))
        with pytest.raises(StoreError, match="written twice"):
            store.append(rows_for([2, 3]), [2, 3])
    write_all(path, list(range(10)))
    assert load_store(path)["id"] == [f"r{i}" for i in range(10)]


def test_unfinished_store_does_not_load_unless_partial(tmp_path):
    path = tmp_path / "s"
    with ShardedStore(path, FP) as store:
        store.set_num_inputs(10)
        store.append(rows_for([0, 1]), [0, 1])
    with pytest.raises(StoreError, match="not finished"):
        load_store(path)
    assert load_store(path, allow_partial=True)["id"] == ["r0", "r1"]


def test_orphan_shard_and_temp_files_are_removed_on_reopen(tmp_path):
    """A crash between the shard rename and the manifest rename leaves an orphan shard; a crash while writing
    leaves a temp file. Neither may reach the output."""
    path = tmp_path / "s"
    with ShardedStore(path, FP) as store:
        store.set_num_inputs(6)
        store.append(rows_for([0, 1, 2]), [0, 1, 2])
    manifest_before = (path / "manifest.json").read_bytes()
    with ShardedStore(path, FP) as store:
        store.append(rows_for([3, 4, 5]), [3, 4, 5])
    (path / "manifest.json").write_bytes(manifest_before)  # as if killed before the manifest rename
    (path / "data" / ".part-00000-of-00001-shard-00002.parquet.tmp-123").write_bytes(b"partial")
    (path / ".manifest.json.tmp-123").write_bytes(b"{")
    with ShardedStore(path, FP) as store:
        assert store.pending(range(6)) == [3, 4, 5]
        assert sorted(p.name for p in (path / "data").iterdir()) == ["part-00000-of-00001-shard-00000.parquet"]
        assert not list(path.glob(".manifest.json.tmp-*"))
        store.append(rows_for([3, 4, 5]), [3, 4, 5])
        store.finish()
    assert load_store(path)["id"] == [f"r{i}" for i in range(6)]


def _hold_lock(path, ready) -> None:
    store = ShardedStore(path, FP)
    ready.set()
    signal.pause()
    store.close()


def test_one_writer_per_part_and_lock_released_when_killed(tmp_path):
    path = tmp_path / "s"
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(path, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(StoreError, match="another process"):
            ShardedStore(path, FP)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    ShardedStore(path, FP).close()  # the OS released the lock with the process


def test_fingerprint_mismatch_is_an_error_unless_overwrite(tmp_path):
    path = tmp_path / "s"
    write_all(path, list(range(4)))
    other = {**FP, "sampling": {"temperature": 1.0}}
    with pytest.raises(FingerprintMismatch, match=r"sampling\.temperature: stored 0\.0, now 1\.0") as caught:
        ShardedStore(path, other)
    assert "--overwrite" in str(caught.value)
    write_all(path, list(range(2)), fingerprint=other, overwrite=True)
    assert load_store(path)["id"] == ["r0", "r1"]
    assert len(list((path / "data").glob("*.parquet"))) == 1


def test_damaged_shard_is_reported(tmp_path):
    path = tmp_path / "s"
    write_all(path, list(range(4)))
    shard = next((path / "data").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match="modified after it was written"):
        ShardedStore(path, FP)


def test_parts_cover_inputs_once_and_merge_by_input_order(tmp_path):
    assert [list(part_range(10, i, 3)) for i in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    path = tmp_path / "s"
    fp = {**FP, "num_parts": 3}
    for part in (2, 0):  # parts finish in any order
        write_all(path, list(part_range(10, part, 3)), fingerprint=fp, part=part, num_parts=3)
    with pytest.raises(StoreError, match=r"parts \[1\] of 3 have no manifest"):
        load_store(path)
    write_all(path, list(part_range(10, 1, 3)), fingerprint=fp, part=1, num_parts=3)
    assert len(read_manifests(path)) == 3
    assert load_store(path)["id"] == [f"r{i}" for i in range(10)]


def test_parts_of_different_jobs_conflict(tmp_path):
    path = tmp_path / "s"
    write_all(path, [0, 1], fingerprint={**FP, "num_parts": 2}, part=0, num_parts=2)
    with pytest.raises(FingerprintMismatch):
        ShardedStore(path, {**FP, "model": "other", "num_parts": 2}, part=1, num_parts=2)


def test_inputs_without_rows_and_types_of_null_columns(tmp_path):
    path = tmp_path / "s"
    import pyarrow as pa

    with ShardedStore(path, FP) as store:
        store.set_num_inputs(4)
        store.append([], [0, 1])  # e.g. prompts that yield no preference pair
        store.append([{"input_index": 2, "note": None}], [2], {"note": pa.string()})
        store.append([{"input_index": 3, "note": "x"}], [3])
        store.finish()
    assert load_store(path)["note"] == [None, "x"]
    with ShardedStore(tmp_path / "t", FP) as store, pytest.raises(StoreError, match="only nulls"):
        store.append([{"input_index": 0, "note": None}], [0])


def test_overwrite_refuses_while_a_part_of_another_layout_is_being_written(tmp_path):
    """Reliability issue: `--overwrite` from a writer with another num_parts deleted the shards of a running job."""
    path = tmp_path / "s"
    other = {**FP, "model": "other", "num_parts": 2}
    with ShardedStore(path, FP) as running:  # a job still writing (its lock held by this process)
        running.set_num_inputs(6)
        running.append(rows_for([0, 1, 2]), [0, 1, 2])
        shards = sorted((path / "data").glob("*.parquet"))
        with pytest.raises(
            StoreError, match=r"cannot overwrite: .*part 0 of 1 is being written.*\.lock-00000-of-00001"
        ):
            ShardedStore(path, other, part=1, num_parts=2, overwrite=True)
        assert sorted((path / "data").glob("*.parquet")) == shards  # nothing deleted
        assert not (path / "manifest-00001-of-00002.json").exists()
        running.append(rows_for([3, 4, 5]), [3, 4, 5])
        running.finish()
    assert load_store(path)["id"] == [f"r{i}" for i in range(6)]
    # once the job is done, the overwrite takes its lock and replaces it
    write_all(path, [3, 4], fingerprint=other, part=1, num_parts=2, overwrite=True)
    assert [m["_file"] for m in read_manifests(path)] == ["manifest-00001-of-00002.json"]
    assert [f.name for f in (path / "data").iterdir()] == ["part-00001-of-00002-shard-00000.parquet"]


def test_overwrite_refuses_while_a_part_without_manifest_yet_is_being_written(tmp_path):
    """A writer that has not committed its first shard has only its lock file (and maybe a temp shard)."""
    path = tmp_path / "s"
    with ShardedStore(path, {**FP, "num_parts": 3}, part=2, num_parts=3):
        with pytest.raises(StoreError, match="part 2 of 3 is being written"):
            ShardedStore(path, FP, overwrite=True)
    ShardedStore(path, FP, overwrite=True).close()


def test_overwrite_leaves_sibling_parts_of_the_same_job_alone(tmp_path):
    """All nodes of a multi-node run may pass --overwrite: a running sibling part is not an obstacle."""
    path = tmp_path / "s"
    fp = {**FP, "num_parts": 2}
    with ShardedStore(path, fp, part=0, num_parts=2, overwrite=True) as sibling:
        sibling.set_num_inputs(1)
        write_all(path, [1], fingerprint=fp, part=1, num_parts=2, overwrite=True)
        sibling.append(rows_for([0]), [0])
        sibling.finish()
    assert load_store(path)["id"] == ["r0", "r1"]


def test_lock_files_are_removed_on_close(tmp_path):
    path = tmp_path / "s"
    with ShardedStore(path, FP) as store:
        assert (path / ".lock-00000-of-00001").exists()
        store.set_num_inputs(1)
        store.append(rows_for([0]), [0])
    assert not list(path.glob(".lock-*"))
    write_all(path, [0, 1], fingerprint={**FP, "x": 1}, overwrite=True)
    assert not list(path.glob(".lock-*"))


def test_soft_locks_exclude_writers_and_a_stale_one_is_named(tmp_path, monkeypatch):
    path = tmp_path / "s"
    monkeypatch.setenv("ALIGN_DISTILL_STORE_LOCK", "soft")
    with ShardedStore(path, FP) as store:
        assert store.lock_kind == "soft"
        with pytest.raises(StoreError, match="another process"):
            ShardedStore(path, FP)
    assert not list(path.glob(".lock-*"))
    # a soft lock left by a writer killed on another node: reported with how to clear it, never broken silently
    (path / ".lock-00000-of-00001").write_text("12345\nother-node\n")
    with pytest.raises(StoreError, match=r"delete .*\.lock-00000-of-00001 and retry"):
        ShardedStore(path, FP)
    (path / ".lock-00000-of-00001").unlink()
    write_all(path, [0, 1])
    assert load_store(path)["id"] == ["r0", "r1"]
    with pytest.raises(ValueError, match="lock_kind must be one of flock, soft"):
        ShardedStore(path, FP, lock_kind="nfs")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_a_shard_names_it_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "s"
    with ShardedStore(path, FP) as store:
        store.set_num_inputs(6)
        store.append(rows_for([0, 1, 2]), [0, 1, 2])
        real_write = store_module.pq.write_table

        def write_half_then_fail(table, where, **kwargs):
            real_write(table, where, **kwargs)
            with open(where, "r+b") as handle:
                handle.truncate(10)
            _no_space()

        monkeypatch.setattr(store_module.pq, "write_table", write_half_then_fail)
        with pytest.raises(OSError) as caught:
            store.append(rows_for([3, 4, 5]), [3, 4, 5])
        assert caught.value.errno == errno.ENOSPC
        shard = path / "data" / "part-00000-of-00001-shard-00001.parquet"
        assert str(caught.value) == (f"[Errno 28] No space left on device: {shard} while writing shard 1 of part 0")
        assert sorted(f.name for f in (path / "data").iterdir()) == ["part-00000-of-00001-shard-00000.parquet"]
        assert len(json.loads((path / "manifest.json").read_text())["shards"]) == 1
        assert store.pending(range(6)) == [3, 4, 5]
    monkeypatch.undo()
    write_all(path, list(range(6)))  # resumes as after a crash
    assert load_store(path)["id"] == [f"r{i}" for i in range(6)]


def test_disk_full_while_writing_the_manifest_names_it_and_uncommits_the_shard(tmp_path, monkeypatch):
    path = tmp_path / "s"
    with ShardedStore(path, FP) as store:
        store.set_num_inputs(4)
        store.append(rows_for([0, 1]), [0, 1])
        real_replace = os.replace

        def replace(source, target):
            if str(target).endswith("manifest.json"):
                _no_space()
            real_replace(source, target)

        monkeypatch.setattr(store_module.os, "replace", replace)
        with pytest.raises(
            OSError,
            match=r"No space left on device: .*manifest\.json while writing the manifest for shard 1 of part 0",
        ):
            store.append(rows_for([2, 3]), [2, 3])
        monkeypatch.undo()
        assert [f.name for f in path.iterdir() if f.name.startswith(".manifest")] == []
        assert [f.name for f in (path / "data").iterdir()] == ["part-00000-of-00001-shard-00000.parquet"]
        assert store.pending(range(4)) == [2, 3]
        store.append(rows_for([2, 3]), [2, 3])
        store.finish()
    assert load_store(path)["id"] == [f"r{i}" for i in range(4)]
