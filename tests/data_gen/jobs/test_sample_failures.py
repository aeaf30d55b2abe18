"""A prompt that an OpenAI-compatible server fails for good: the `sample` job records it as a failed row, goes on
with the others and exits 0; readers skip the failed row and say so; `retry_failed` asks again for that prompt only
and replaces the failed row, exactly once. Against the scripted local server of the backend tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest

from align_distill.data import load_rows
from align_distill.data_gen import load_store
from align_distill.data_gen.command import main
from align_distill.data_gen.store import ShardedStore, StoreError, store_summary
from align_distill.synthetic import prompt_rows
from tests.data_gen.backends.test_openai_backend import FakeServer, ok_reply

REFUSAL = "prompt rejected by the content filter"


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def job_yaml(tmp_path: Path, server: FakeServer, tokenizer: Path, rows: list[dict], **extra) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "input": str(data),
        "output_dir": str(tmp_path / "out"),
        "model": "served-teacher",
        "backend": "openai",
        "tokenizer": str(tokenizer),
        "backend_kwargs": {"base_url": server.url, "max_retries": 1, "backoff_base": 0.01},
        "temperature": 0.0,
        "max_completion_length": 4,
        "shard_size": 2,
        "progress": False,
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def refusing(bad: str, broken: dict[str, bool]):
    """The server's answers: HTTP 400 (never retried) for the prompt `bad` while `broken["on"]`."""

    def reply(path: str, body: dict):
        if broken["on"] and body["messages"][-1]["content"] == bad:
            return 400, {"error": {"message": REFUSAL}}, {}, 0.0
        return ok_reply(path, body)

    return reply


def test_a_prompt_failed_for_good_is_a_failed_row_and_retry_failed_replaces_it(
    tmp_path, server, tiny_models, capsys, caplog
):
    rows = prompt_rows(5, 1)
    bad = rows[2]["prompt"][-1]["content"]
    broken = {"on": True}
    server.default = refusing(bad, broken)
    config = job_yaml(tmp_path, server, tiny_models["teacher"], rows)
    out = tmp_path / "out"

    caplog.set_level(logging.INFO)
    assert main(["sample", "--config", str(config)]) == 0  # the job goes on past the failed prompt
    assert "sample: 1 row of" in caplog.text and "failed for good" in caplog.text and "retry_failed" in caplog.text
    assert "sample: done" in (said := capsys.readouterr()).out and "sample: 1 rows failed for good" in said.err
    stored = load_store(out, include_failed=True).to_list()
    assert [r["id"] for r in stored] == [r["id"] for r in rows]
    (failed,) = [r for r in stored if r["error"] is not None]
    assert failed["id"] == rows[2]["id"] and REFUSAL in failed["error"] and "HTTP 400" in failed["error"]
    assert failed["finish_reason"] == "error" and failed["completion_ids"] == []
    assert all(r["finish_reason"] == "length" and r["completion_ids"] for r in stored if r is not failed)
    assert store_summary(out) == {"rows": 5, "failed": 1, "inputs": 5, "complete": True}

    # readers skip the failed row and say how many they skipped: the store reader and the dataset loader
    caplog.clear()
    good = load_store(out)
    assert len(good) == 4 and rows[2]["id"] not in good["id"] and "error" not in good.column_names
    assert "skipped 1 failed row" in caplog.text
    caplog.clear()
    assert len(load_rows(str(out))) == 4 and "skipped 1 failed row" in caplog.text

    # a plain rerun does not stop on it, nor ask again: the failed row is a committed result
    asked = len(server.requests)
    caplog.clear()
    assert main(["sample", "--config", str(config)]) == 0
    assert len(server.requests) == asked and "sample: 1 row of" in caplog.text

    # retried while the server still refuses: still one failed row, not two
    caplog.clear()
    assert main(["sample", "--config", str(config), "--retry_failed", "true"]) == 0
    assert len(server.requests) == asked + 1 and "retrying the 1 failed inputs" in caplog.text
    assert "sample: 1 row of" in caplog.text and len(load_store(out, include_failed=True)) == 5

    # the server is fixed: only the failed prompt is asked again, and its good row replaces the failed one
    broken["on"] = False
    caplog.clear()
    assert main(["sample", "--config", str(config), "--retry_failed", "true"]) == 0
    assert len(server.requests) == asked + 2 and server.requests[-1][2]["messages"][-1]["content"] == bad
    assert "failed for good" not in caplog.text
    stored = load_store(out, include_failed=True).to_list()
    assert [r["id"] for r in stored] == [r["id"] for r in rows]  # each input once, in input order
    assert all(r["error"] is None and r["finish_reason"] == "length" for r in stored)
    assert store_summary(out)["failed"] == 0
    # the parquet files themselves hold each row once: no stale shard left behind
    files = sorted(str(p) for p in (out / "data").glob("*.parquet"))
    direct = datasets.load_dataset("parquet", data_files=files, split="train")
    assert sorted(direct["id"]) == sorted(r["id"] for r in rows)


def test_retry_failed_is_a_boolean_job_key(tmp_path, server, tiny_models, capsys):
    config = job_yaml(tmp_path, server, tiny_models["teacher"], prompt_rows(2, 1), retry_failed=True)
    assert main(["sample", "--config", str(config)]) == 0  # nothing failed: a retry of nothing is a normal run
    assert main(["sample", "--config", str(config), "--retry_failed", "maybe"]) == 2
    assert "`retry_failed`: expected" in capsys.readouterr().err
    assert main(["sample", "--help"]) == 0 and "retry_failed (bool, default False)" in capsys.readouterr().out


def test_a_crash_while_replacing_failed_rows_keeps_the_old_rows(tmp_path, monkeypatch):
    """The manifest is the commit point of a replacement too: a failed manifest write leaves the failed row (and
    no second copy of the input), and the rewritten shard is not listed."""
    rows = [{"id": f"r{i}", "input_index": i, "text": f"t{i}", "error": "boom" if i == 1 else None} for i in range(3)]
    path = tmp_path / "s"
    with ShardedStore(path, {"job": "test"}, failed_column="error") as store:
        store.append(rows, [0, 1, 2])
        assert store.failed_inputs() == [1] and store.num_failed == 1

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("align_distill.data_gen.store.atomic_write_bytes", disk_full)
        with pytest.raises(OSError, match="No space left"):
            store.replace([{"id": "r1", "input_index": 1, "text": "fixed", "error": None}], [1])
        monkeypatch.undo()
        assert store.failed_inputs() == [1]
        with pytest.raises(StoreError, match="not failed"):
            store.replace([{"id": "r0", "input_index": 0, "text": "again", "error": None}], [0])
    assert len(list((path / "data").glob("*.parquet"))) == 1
    assert load_store(path, allow_partial=True, include_failed=True)["text"] == ["t0", "t1", "t2"]
    with ShardedStore(path, {"job": "test"}, failed_column="error") as store:
        store.replace([{"id": "r1", "input_index": 1, "text": "fixed", "error": None}], [1])
        assert store.failed_inputs() == [] and store.num_failed == 0
    assert load_store(path, allow_partial=True)["text"] == ["t0", "fixed", "t2"]
    assert len(list((path / "data").glob("*.parquet"))) == 1  # the old shard file is gone
