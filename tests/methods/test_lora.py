"""LoRA through the CLI (TRL ModelConfig: use_peft, lora_r, lora_alpha, lora_target_modules) for sft and dpo:
only adapter weights train, the output folder is an adapter, and merging it gives the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

LORA = {
    "use_peft": True,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "v_proj"],
}
TRAIN = {
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-2,
    "max_length": 64,
    "bf16": False,
    "save_strategy": "no",
    "gradient_checkpointing": False,
    "dataloader_pin_memory": False,
    "disable_tqdm": True,
    "seed": 0,
}
DATA = {"sft": "sft.jsonl", "dpo": "pairs.jsonl"}


@pytest.fixture(scope="module")
def lora_runs(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """`align-distill train {sft,dpo}` with LoRA on the tiny student: {method: (output folder, trainer)}."""
    from transformers import Trainer

    from align_distill.cli import main as cli_main
    from align_distill.quickstart import write_data

    root = tmp_path_factory.mktemp("lora")
    write_data(root, n_sft=16, n_pairs=16, n_prompts=4)
    captured: list = []
    original = Trainer.train

    def train(self, *args, **kwargs):
        captured.append(self)
        return original(self, *args, **kwargs)

    Trainer.train = train
    runs = {}
    try:
        for method, data in DATA.items():
            recipe = {
                "model_name_or_path": str(tiny_models["student"]),
                "dataset_name": str(root / data),
                "output_dir": str(root / method),
                **TRAIN,
                **LORA,
            }
            (root / f"{method}.yaml").write_text(yaml.safe_dump(recipe))
            assert cli_main(["train", method, "--config", str(root / f"{method}.yaml")]) == 0
            runs[method] = (root / method, captured[-1])
    finally:
        Trainer.train = original
    return runs


def base_key(peft_name: str) -> str:
    """PEFT's name of a base weight -> the checkpoint key (`base_model.model.` prefix, `.base_layer` infix)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.mark.slow
@pytest.mark.parametrize("method", DATA)
def test_only_adapter_weights_train(lora_runs, tiny_models, method):
    _, trainer = lora_runs[method]
    base = load_file(tiny_models["student"] / "model.safetensors")
    lora, covered = 0, set()
    for name, parameter in trainer.model.named_parameters():
        if "lora_" in name:
            lora += 1
            assert parameter.requires_grad, name
            if "lora_B" in name:  # initialised to zero: non-zero means it trained
                assert parameter.detach().abs().max() > 0, f"{name} did not train"
        else:  # every base weight is frozen and bit-identical to the checkpoint after training
            covered.add(base_key(name))
            assert not parameter.requires_grad, name
            torch.testing.assert_close(parameter.detach(), base[base_key(name)], rtol=0, atol=0, msg=name)
    assert covered <= set(base) and set(base) - covered <= {"lm_head.weight"}  # a tied head is listed once
    layers = 2  # the tiny student
    assert lora == layers * len(LORA["lora_target_modules"]) * 2  # A and B per targeted projection


@pytest.mark.slow
@pytest.mark.parametrize("method", DATA)
def test_saved_folder_is_an_adapter(lora_runs, method):
    out, _ = lora_runs[method]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights), sorted(weights)
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert (out / "tokenizer.json").exists()  # the folder loads as one checkpoint: adapter + tokenizer


def logits_of(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["sort: b a c", "reverse: a b"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("method", DATA)
def test_merged_model_matches_adapter(lora_runs, tiny_models, tmp_path, method):
    from peft import PeftModel

    from align_distill.models import load_model, load_tokenizer
    from align_distill.models.merge import merge_command

    adapter, _ = lora_runs[method]
    merged_dir = tmp_path / "merged"
    assert merge_command(str(adapter), str(merged_dir)) == 0
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "config.json").exists()
    assert not (merged_dir / "adapter_config.json").exists()
    tokenizer = load_tokenizer(merged_dir)

    merged = load_model(merged_dir, dtype="float32").eval()
    with_adapter = PeftModel.from_pretrained(load_model(tiny_models["student"], dtype="float32"), str(adapter)).eval()
    base = load_model(tiny_models["student"], dtype="float32").eval()
    expected = logits_of(with_adapter, tokenizer)
    torch.testing.assert_close(logits_of(merged, tokenizer), expected, rtol=1e-5, atol=1e-5)
    assert (logits_of(base, tokenizer) - expected).abs().max() > 1e-4  # the adapter did change the model


def test_merge_refuses_bad_folders(tmp_path, capsys):
    from align_distill.models.merge import merge_command

    (tmp_path / "not_adapter").mkdir()
    assert merge_command(str(tmp_path / "not_adapter"), str(tmp_path / "out")) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "taken").mkdir()
    assert merge_command(str(tmp_path / "adapter"), str(tmp_path / "taken")) == 2
    assert "exists" in capsys.readouterr().err
    assert merge_command(str(tmp_path / "adapter"), str(tmp_path / "out")) == 2
    assert "base_model_name_or_path" in capsys.readouterr().err
