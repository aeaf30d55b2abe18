"""LLaVA-MoD end to end on a tiny LLaVA: d2d → upcycle → d2s → preference distillation with the teacher as the
reference, and the `mod` method on image files (docs/methods/llava_mod.md §4-§5)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForImageTextToText, AutoProcessor

from align_distill.losses import sequence_logps, teacher_ref_preference_loss
from align_distill.models.moe import d2s_parameter_names, upcycle_to_moe
from align_distill.models.tiny_vision import make_tiny_llava_models
from align_distill.synthetic import visual
from align_distill.trainers.common import response_view
from align_distill.trainers.mod_mimic import MoDMimicConfig, MoDMimicTrainer
from align_distill.trainers.mod_preference import MoDPreferenceConfig, MoDPreferenceTrainer
from tests.trainers.test_mod import changed_names, snapshot

COMMON = dict(
    max_steps=2,
    per_device_train_batch_size=4,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    max_length=128,
    dataloader_pin_memory=False,
    disable_tqdm=True,
)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    paths = make_tiny_llava_models(tmp_path_factory.mktemp("mod_llava"))
    processor = AutoProcessor.from_pretrained(paths["student"])
    teacher = AutoModelForImageTextToText.from_pretrained(paths["teacher"]).eval()
    student = AutoModelForImageTextToText.from_pretrained(paths["student"])
    return paths, processor, teacher, student


def _vision(names):
    return {n for n in names if "vision_tower" in n}


@pytest.mark.slow
def test_both_stages_end_to_end_on_tiny_llava(llava, tmp_path):
    _, processor, teacher, student = llava
    sft = Dataset.from_list(visual.visual_sft_rows(8, seed=0))
    pairs = Dataset.from_list(visual.visual_preference_rows(8, seed=1))
    student = copy.deepcopy(student)
    names = {n for n, _ in student.named_parameters()}

    # stage 1a, d2d: LM + projector train, the vision tower is frozen
    d2d = MoDMimicTrainer(
        model=student,
        teacher_model=teacher,
        args=MoDMimicConfig(output_dir=str(tmp_path), stage="d2d", learning_rate=1e-2, **COMMON),
        train_dataset=sft,
        processing_class=processor,
    )
    batch = d2d._prepare_inputs(next(iter(d2d.get_train_dataloader())))
    assert "pixel_values" in batch and (batch["labels"] != -100).any()
    before = snapshot(student)
    d2d.train()
    changed = changed_names(student, before)
    assert changed == names - _vision(names)
    assert any("multi_modal_projector" in n for n in changed)
    assert all(math.isfinite(log["kd_loss"]) for log in d2d.state.log_history if "kd_loss" in log)

    # upcycle + stage 1b, d2s: only FFN / experts / routers + projector train
    moe = upcycle_to_moe(student)
    assert moe.config.text_config.model_type == "qwen2_moe"
    trainable = set(d2s_parameter_names(moe))
    d2s = MoDMimicTrainer(
        model=moe,
        teacher_model=teacher,
        args=MoDMimicConfig(output_dir=str(tmp_path), stage="d2s", learning_rate=1e-2, **COMMON),
        train_dataset=sft,
        processing_class=processor,
    )
    before = snapshot(moe)
    d2s.train()
    changed = changed_names(moe, before)
    frozen = set(before) - trainable
    assert not (changed & frozen) and _vision(frozen) == _vision(set(before))
    assert any("multi_modal_projector" in n for n in changed) and any(".mlp.gate." in n for n in changed)
    logs = d2s.state.log_history[0]
    assert logs["aux_loss"] >= 1.0 - 1e-6 and logs["ce_loss"] > 0

    # stage 2: preference distillation, teacher log-probs precomputed on the images, then the teacher is freed
    pd = MoDPreferenceTrainer(
        model=moe,
        teacher_model=teacher,
        args=MoDPreferenceConfig(
            output_dir=str(tmp_path), precompute_ref_log_probs=True, learning_rate=1e-2, **COMMON
        ),
        train_dataset=pairs,
        processing_class=processor,
    )
    assert pd.ref_model is None and {"ref_chosen_logps", "ref_rejected_logps"} <= set(pd.train_dataset.column_names)
    # the precomputed teacher log-probs are the teacher's summed response log-probs on the same images
    batch = pd._prepare_inputs(next(iter(pd.get_train_dataloader())))
    assert "pixel_values" in batch
    with torch.no_grad():
        logits = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    aligned, labels, mask = response_view(logits, batch["input_ids"], batch["completion_mask"])
    chosen, rejected = sequence_logps(aligned, labels, mask).chunk(2)
    assert torch.allclose(batch["ref_chosen_logps"], chosen, atol=1e-3)
    assert torch.allclose(batch["ref_rejected_logps"], rejected, atol=1e-3)
    before = snapshot(moe)
    pd.train()
    changed = changed_names(moe, before)
    assert changed and changed <= trainable
    assert pd.state.log_history[0]["aux_loss"] >= 2.0 - 1e-5
    assert 0.0 <= visual.evaluate_visual(moe, processor, n=4).reward <= 1.0


def test_preference_loss_on_images_uses_the_live_teacher(llava, tmp_path):
    _, processor, teacher, student = llava
    trainer = MoDPreferenceTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher,
        args=MoDPreferenceConfig(output_dir=str(tmp_path), loss_type="kto_pair", **COMMON),
        train_dataset=Dataset.from_list(visual.visual_preference_rows(4, seed=2)),
        processing_class=processor,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    logps = []
    for model in (trainer.model, teacher):
        with torch.no_grad():
            aligned, labels, mask = response_view(model(**inputs).logits, batch["input_ids"], batch["completion_mask"])
        logps.extend(sequence_logps(aligned, labels, mask).chunk(2))
    expected, *_ = teacher_ref_preference_loss(*logps, beta=0.1, loss_type="kto_pair")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.slow
def test_mod_method_on_image_files(llava, tmp_path):
    """`align-distill train mod` with a LLaVA folder: processor and images are loaded from files, d2s upcycles a
    LLaVA into LLaVA + Qwen2-MoE and saves it so it reloads."""
    from align_distill.pipeline import Pipeline, Stage

    paths, processor, _, _ = llava
    visual.write_visual_data(tmp_path / "data", seed=0, n_sft=8, n_pairs=8)
    common = {**COMMON, "teacher_model_name_or_path": str(paths["teacher"]), "bf16": False}
    stages = [
        Stage(
            "d2s",
            "train",
            "mod",
            {
                **common,
                "stage": "d2s",
                "model_name_or_path": str(paths["student"]),
                "dataset_name": str(tmp_path / "data" / "sft.jsonl"),
            },
        ),
        Stage(
            "pd",
            "train",
            "mod",
            {
                **common,
                "stage": "pd",
                "model_name_or_path": "${d2s}",
                "precompute_ref_log_probs": True,
                "dataset_name": str(tmp_path / "data" / "pairs.jsonl"),
            },
        ),
    ]
    Pipeline(tmp_path / "run", stages).run()
    result = json.loads((tmp_path / "run" / "pd" / "stage.json").read_text())["result"]
    assert result["total_parameters"] > result["activated_parameters"] > result["trainable_parameters"]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "pd")
    assert model.config.text_config.model_type == "qwen2_moe"
    evaluation = visual.evaluate_visual(model, AutoProcessor.from_pretrained(tmp_path / "run" / "pd"), n=4)
    assert 0.0 <= evaluation.reward <= 1.0
