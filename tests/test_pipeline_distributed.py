"""`torchrun --nproc_per_node 2 -m align_distill.cli pipeline RECIPE`: two gloo processes run one pipeline. Only
rank 0 runs the `call` stages and touches the run folder; both ranks train; the run folder ends up as one process
would leave it, and a rerun skips every stage on both ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from align_distill.quickstart import write_data
from tests.test_distributed import free_port, run

CALL = "tests.pipeline_stages"


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_on_two_processes(tmp_path, tiny_models):
    (tmp_path / "data").mkdir()
    write_data(tmp_path / "data", n_sft=16, n_pairs=4, n_prompts=4)
    sft = {
        "model_name_or_path": str(tiny_models["student"]),
        "dataset_name": str(tmp_path / "data" / "sft.jsonl"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "max_length": 64,
        "gradient_checkpointing": False,
        "report_to": "none",
        "bf16": False,
    }
    stages = [
        {"name": "world", "call": f"{CALL}:world"},
        {"name": "number", "call": f"{CALL}:write_number", "config": {"value": 3, "name": "n"}},
        {"name": "sft", "train": "sft", "config": sft},
    ]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": stages}))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "align_distill.cli"]
    run([*command, "pipeline", str(recipe)], tmp_path / "first.log")  # fails the test unless both ranks exit 0

    calls = (tmp_path / "calls.log").read_text().split()
    assert calls == ["w", "n"]  # each `call` stage ran once, on one rank
    assert (tmp_path / "run" / "world" / "world.txt").read_text() == "2 0"  # rank 0 of a 2-process group
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["number", "sft", "world"]  # no .partial/.trash
    for name in ("world", "number", "sft"):
        assert json.loads((tmp_path / "run" / name / "stage.json").read_text())["stage"] == name
    assert (tmp_path / "run" / "sft" / "model.safetensors").is_file()
    log = (tmp_path / "first.log").read_text()
    assert log.count("[3/3] sft: finished in") == 1  # progress is printed by the main process only

    run([*command, "pipeline", str(recipe)], tmp_path / "second.log")
    assert (tmp_path / "calls.log").read_text().split() == ["w", "n"]
    assert (tmp_path / "second.log").read_text().count("skipped") == 3
