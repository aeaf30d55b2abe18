"""A training stage killed after its first checkpoint resumes from it: the same final weights as an uninterrupted
run, and no step done twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align_distill.quickstart import write_data

REPO = Path(__file__).resolve().parents[1]
SAVE_STEPS, MAX_STEPS = 2, 6


def sft_recipe(tmp_path: Path, tiny_models: dict, run: str) -> Path:
    config = {
        "model_name_or_path": str(tiny_models["student"]),
        "dataset_name": str(tmp_path / "data" / "sft.jsonl"),
        "max_steps": MAX_STEPS,
        "save_strategy": "steps",
        "save_steps": SAVE_STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "seed": 0,
        "max_length": 64,
        "gradient_checkpointing": False,
        "report_to": "none",
        "bf16": False,
        "dataloader_num_workers": 0,
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(
        yaml.safe_dump({"run_dir": str(tmp_path / run), "stages": [{"name": "sft", "train": "sft", "config": config}]})
    )
    return path


def pipeline(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "align_distill.cli", "pipeline", str(recipe)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.mark.slow
def test_killed_training_stage_resumes_from_its_last_checkpoint(tmp_path, tiny_models):
    (tmp_path / "data").mkdir()
    write_data(tmp_path / "data", n_sft=64, n_pairs=4, n_prompts=4)
    reference = pipeline(sft_recipe(tmp_path, tiny_models, "reference"))

    killed = pipeline(sft_recipe(tmp_path, tiny_models, "run"))
    first = tmp_path / "run" / ".sft.partial" / f"checkpoint-{SAVE_STEPS}"
    deadline = time.time() + 120
    while not (first / "trainer_state.json").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    out, _ = killed.communicate()
    assert killed.returncode == -signal.SIGKILL, out[-4000:]
    assert not (tmp_path / "run" / "sft").exists()
    saved = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    out = finish(pipeline(sft_recipe(tmp_path, tiny_models, "run")))
    assert "interrupted before; resuming" in out and "resuming from" in out
    finish(reference)
    final, expected = tmp_path / "run" / "sft", tmp_path / "reference" / "sft"
    record = json.loads((final / "stage.json").read_text())
    assert record["resumed_from"] == f"checkpoint-{SAVE_STEPS}"
    assert {p.name: p.stat().st_mtime_ns for p in (final / first.name).iterdir()} == saved  # not redone
    got, want = weights(final), weights(expected)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    history = json.loads((final / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["log_history"]
    steps = [entry["step"] for entry in history if "loss" in entry]
    assert steps == list(range(1, MAX_STEPS + 1))  # each step logged once: none was repeated after the resume
