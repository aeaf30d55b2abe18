"""CycleAlign's reload of a cycle's adapter between cycles follows the project's loading policy: safetensors only.
No model is loaded: the base loader is a stub and `PeftModel.from_pretrained` must never be reached."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from peft import PeftModel

from align_distill.models.loading import SafetensorsRequiredError
from align_distill.trainers.cyclealign import CycleAlign, CycleAlignConfig


def test_adapter_reload_refuses_a_pickle_adapter(tmp_path, monkeypatch):
    adapter = tmp_path / "run" / "cycle_1" / "model"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "base"}))
    (adapter / "adapter_model.bin").write_bytes(b"a pickle: unpickling it could run code")

    def unpickles(*args, **kwargs):
        raise AssertionError("PeftModel.from_pretrained was handed a folder with only pickle adapter weights")

    monkeypatch.setattr(PeftModel, "from_pretrained", unpickles)
    bases: list[str] = []

    def base_loader(source: str) -> torch.nn.Module:
        bases.append(source)
        return torch.nn.Linear(1, 1)

    args = CycleAlignConfig(output_dir=str(tmp_path / "run"), report_to="none", static_demonstrations="none")
    prompts = datasets.Dataset.from_list([{"id": "p0", "prompt": "reverse: a b"}])
    loop = CycleAlign(str(tmp_path / "base"), None, args, prompts, black_box=object(), model_loader=base_loader)
    with pytest.raises(SafetensorsRequiredError) as raised:
        loop._ensure_model(str(adapter))
    message = str(raised.value)
    assert "no adapter_model.safetensors" in message and "adapter_model.bin" in message
    assert "safetensors only" in message and str(adapter) in message
    assert loop.model is None and loop.model_source == str(tmp_path / "base")  # nothing half-loaded is kept
