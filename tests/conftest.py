"""Shared fixtures. Tiny models are built once per session: tokenizer training and saving take ~1 s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and the distributed / vLLM tests start extra processes on a
# 2-core machine: one thread each avoids oversubscription (measured here: 2 threads were up to 30x slower under load).
# Set once for the whole session (no test raises it), so no OpenMP pool is active when a test forks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# One vLLM engine and one `vllm serve` process shared by every vLLM test (see tests/vllm_fixtures.py).
pytest_plugins = ["tests.vllm_fixtures"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Paths of a locally trained tokenizer and random tiny teacher/student (qwen2) sharing it.

    Keys: `tokenizer`, `teacher`, `student`; each model folder also holds the tokenizer files.
    Treat these folders as read-only: copy before training into them.
    """
    from align_distill.models.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


# A method script's smallest run: one step, tiny batch, nothing saved but the final model.
ONE_STEP = {
    "max_steps": 1,
    "per_device_train_batch_size": 4,
    "gradient_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "max_length": 64,
}


@pytest.fixture
def run_method(tmp_path):
    """`run_method(name, **config)`: the method's script (`main`) through its argument parser, as `align-distill
    train` runs it, one step into `tmp_path/student` unless `config` says otherwise; returns its metrics."""

    def run(method: str, **config):
        from transformers import HfArgumentParser

        from align_distill.methods import method_module

        module = method_module(method)
        settings = {**ONE_STEP, "output_dir": str(tmp_path / "student"), **config}
        return module.main(*HfArgumentParser(module.DATACLASSES).parse_dict(settings))

    return run
