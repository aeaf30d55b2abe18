"""The tiny vision example (the `mod/vision_tiny` recipe): `call` stages that prepare the LLaVA teacher (TRL's own
SFT / DPO trainers on the coloured-shapes task, which TRL supports for vision-language models) and score models
with `evaluate_visual`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from align_distill.methods.common import save_final
from align_distill.models import load_model
from align_distill.synthetic.visual import evaluate_visual, load_visual_dataset

# `call` stages that prepare the LLaVA teacher (TRL's own SFT / DPO trainers on the coloured-shapes task, which TRL
# supports for vision-language models) and score models with `evaluate_visual`.

_VISION_DEFAULTS: dict[str, Any] = {
    "bf16": False,
    "report_to": "none",
    "save_strategy": "no",
    "max_length": 128,
    "dataloader_pin_memory": False,
    "remove_unused_columns": False,
}


def _vision_model(path: str) -> Any:
    """A LLaVA folder through the project's loading policy (safetensors only, no remote code)."""
    return load_model(path, dtype="auto", model_class=AutoModelForImageTextToText)


def vision_sft(out: str, model_name_or_path: str, dataset_path: str, **training: Any) -> dict:
    """TRL SFT of a LLaVA folder on vision prompt/completion data (JSONL + images); saves model + processor."""

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    trainer = SFTTrainer(
        model=_vision_model(model_name_or_path),
        args=SFTConfig(output_dir=str(out), **{**_VISION_DEFAULTS, **training}),
        train_dataset=load_visual_dataset(dataset_path, "completion"),
        processing_class=processor,
    )
    result = trainer.train()
    save_final(trainer, processor, str(out))
    return dict(result.metrics)


def vision_dpo(out: str, model_name_or_path: str, dataset_path: str, **training: Any) -> dict:
    """TRL DPO (the model's own initialisation as reference) of a LLaVA folder on vision preference data."""

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    trainer = DPOTrainer(
        model=_vision_model(model_name_or_path),
        ref_model=_vision_model(model_name_or_path),
        args=DPOConfig(output_dir=str(out), **{**_VISION_DEFAULTS, **training}),
        train_dataset=load_visual_dataset(dataset_path, "preference"),
        processing_class=processor,
    )
    result = trainer.train()
    save_final(trainer, processor, str(out))
    return dict(result.metrics)


def evaluate_vision(out: str, models: dict[str, str], n: int = 200, seed: int = 0) -> dict[str, dict]:
    """Greedy coloured-shapes reward of every model (LLaVA folders) on `seed`'s test scenes (no training scene is
    among them); prints a table and writes `eval.json`."""

    results = {}
    for name, path in models.items():
        model = _vision_model(path)
        results[name] = evaluate_visual(model, AutoProcessor.from_pretrained(path), n=n, seed=seed).as_dict()
        row = results[name]
        print(
            f"  {name:16s} reward {row['reward']:.3f}  capability {row['capability']:.3f}  "
            f"preference {row['preference']:.3f}",
            flush=True,
        )
    (Path(out) / "eval.json").write_text(json.dumps(results, indent=2))
    return results
