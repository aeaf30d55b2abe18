"""The tiny vision example's call stages load LLaVA folders through the project's loading policy."""

from __future__ import annotations

import pytest
import torch

from align_distill.models.loading import SafetensorsRequiredError
from align_distill.models.tiny_vision import make_tiny_llava_models
from align_distill.quickstart.vision import _vision_model


@pytest.mark.slow
def test_vision_models_load_from_safetensors_only(tmp_path):
    folders = make_tiny_llava_models(tmp_path / "models")
    model = _vision_model(str(folders["student"]))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    pickled = folders["student"]
    state = model.state_dict()
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(SafetensorsRequiredError, match="safetensors only"):
        _vision_model(str(pickled))
