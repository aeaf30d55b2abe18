"""Shared fixtures. Tiny models are built once per session: tokenizer training and saving take ~1 s."""

from __future__ import annotations

from pathlib import Path

import pytest

# One vLLM engine and one `vllm serve` process shared by every vLLM test (see tests/vllm_fixtures.py).
pytest_plugins = ["vllm_fixtures"]


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
