"""`generate` stores are dataset inputs everywhere: `load_rows`, `data validate`, the trainers' `load_dataset_for`."""

from __future__ import annotations

import json

import pytest

from align_distill.data import DataValidationError, load_dataset_for, load_rows, validate_command
from align_distill.data.stores import is_store, read_store
from align_distill.data_gen import load_store, run_job
from align_distill.data_gen.store import ShardedStore
from align_distill.synthetic import prompt_rows


@pytest.fixture(scope="module")
def sample_store(tiny_models, tmp_path_factory) -> str:
    """A real `generate sample` store: 5 prompts, 2 parts, shards of 2 inputs (so several shards per part)."""
    folder = tmp_path_factory.mktemp("store")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(5, 3)))
    common = {
        "input": str(prompts),
        "output_dir": str(folder / "samples"),
        "model": str(tiny_models["teacher"]),
        "max_completion_length": 4,
        "temperature": 0.0,
        "shard_size": 2,
        "num_parts": 2,
        "progress": False,
    }
    for part in (1, 0):
        run_job("sample", {**common, "part": part})
    return common["output_dir"]


def test_a_store_is_read_by_load_rows_in_input_order(sample_store):
    assert is_store(sample_store)
    rows = load_rows(sample_store)
    assert rows["id"] == [f"prompt-3-{i}" for i in range(5)]
    assert rows["input_index"] == list(range(5))
    assert rows.to_list() == load_store(sample_store).to_list() == read_store(sample_store).to_list()


def test_a_store_validates_and_loads_for_training(sample_store, capsys):
    assert validate_command(sample_store, "completion") == 0
    assert capsys.readouterr().out.strip().startswith("OK: 5 rows (completion")
    dataset = load_dataset_for(sample_store, "completion")
    assert dataset["id"] == [f"prompt-3-{i}" for i in range(5)]
    assert dataset["completion"] == load_store(sample_store)["completion"]


def test_only_committed_shards_are_read_and_incomplete_stores_are_named(tmp_path):
    path = tmp_path / "s"
    with ShardedStore(path, {"job": "test"}) as store:
        store.set_num_inputs(3)
        store.append([{"input_index": 0, "id": "a", "prompt": "p", "completion": "c"}], [0])
        (path / "data" / "part-00000-of-00001-shard-00001.parquet").write_bytes(b"orphan")  # never committed
        with pytest.raises(DataValidationError, match=r"cannot read generate store: .*not finished"):
            load_rows(str(path))
        store.append([{"input_index": 1, "id": "b", "prompt": "p", "completion": "d"}], [1, 2])
        store.finish()
    assert load_rows(str(path))["id"] == ["a", "b"]
    with pytest.raises(DataValidationError, match="a generate store holds one split"):
        load_rows(str(path), split="test")
    next((path / "data").glob("*.parquet")).unlink()  # a manifest naming a missing shard
    with pytest.raises(DataValidationError, match="manifests list 1 shard file"):
        load_rows(str(path))
