"""Tiny LLaVA builder (models.tiny_vision) and the coloured-shapes task (synthetic.visual)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from align_distill.models.tiny_vision import IMAGE_TOKEN, IMAGE_TOKENS_PER_IMAGE, make_tiny_llava_models
from align_distill.synthetic import visual


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_llava_models(tmp_path_factory.mktemp("tiny_llava"))


def test_tiny_llava_loads_with_its_processor_and_expands_image_tokens(llava):
    processor = AutoProcessor.from_pretrained(llava["student"])
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision needed
    teacher = AutoModelForImageTextToText.from_pretrained(llava["teacher"])
    student = AutoModelForImageTextToText.from_pretrained(llava["student"])
    assert type(student).__name__ == "LlavaForConditionalGeneration"
    assert student.config.text_config.model_type == "qwen2"
    assert student.num_parameters() < teacher.num_parameters()
    # one shared "CLIP": identical vision tower weights, different language models
    for (name, a), (_, b) in zip(
        teacher.model.vision_tower.named_parameters(), student.model.vision_tower.named_parameters()
    ):
        assert torch.equal(a, b), name
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.count(IMAGE_TOKEN) == 1 and text.endswith("<|im_start|>assistant\n")
    scene = visual.scenes(1, seed=0)[0]
    batch = processor(images=[[scene.image()]], text=[text], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (batch["input_ids"] == image_id).sum().item() == IMAGE_TOKENS_PER_IMAGE == 16
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        logits = student(**batch).logits
        other = student(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}).logits
    assert logits.shape[-1] == len(processor.tokenizer)
    assert not torch.allclose(logits[0, -1], other[0, -1])  # the answer depends on the image


def test_scenes_and_reward():
    scene = visual.Scene(colour="red", shape="triangle", box=(4, 4, 25, 25), asks="colour")
    assert visual.reward(scene, "sure, red").total == 1.0
    assert visual.reward(scene, "fine, red") == visual.Reward(capability=1.0, preference=0.0)
    assert visual.reward(scene, "sure, blue") == visual.Reward(capability=0.0, preference=1.0)
    assert visual.reward(scene, "").total == 0.0
    image = scene.image()
    assert image.size == (32, 32) and image.getpixel((15, 20)) == visual.COLOURS["red"]
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert visual.scenes(5, seed=3) == visual.scenes(5, seed=3) != visual.scenes(5, seed=4)


def test_preference_rows_prefer_polite_and_correct():
    rows = visual.visual_preference_rows(40, seed=1)
    scenes = visual.scenes(40, seed=1)
    wrong = 0
    for row, scene in zip(rows, scenes):
        assert visual.reward(scene, row["chosen"][0]["content"]).total == 1.0
        rejected = visual.reward(scene, row["rejected"][0]["content"])
        assert rejected.preference == 0.0
        wrong += rejected.capability == 0.0
    assert 0 < wrong < 40
    sft = visual.visual_sft_rows(40, seed=0)
    polite = sum(r["completion"][0]["content"].startswith(visual.POLITE) for r in sft)
    assert 0 < polite < 40  # the SFT marker rule is arbitrary, so SFT alone does not align


def test_visual_files_round_trip_and_errors_name_the_row(tmp_path):
    counts = visual.write_visual_data(tmp_path, seed=0, n_sft=4, n_pairs=3)
    assert counts == {"sft.jsonl": 4, "pairs.jsonl": 3}
    sft = visual.load_visual_dataset(tmp_path / "sft.jsonl", "completion")
    assert len(sft) == 4 and sft[0]["images"][0].size == (32, 32) and sft[0]["id"] == "vsft-0-0"
    assert list(sft[0]["images"][0].getdata()) == list(visual.visual_sft_rows(1, 0)[0]["images"][0].getdata())
    pairs = visual.load_visual_dataset(tmp_path / "pairs.jsonl", "preference")
    assert set(pairs.column_names) == {"id", "images", "prompt", "chosen", "rejected"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "q", "completion": "a", "images": ["nope.png"]})
        + "\n"
        + json.dumps({"prompt": "q", "images": [{"type": "image"}]})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:1: column `images`: file\(s\) not found") as error:
        visual.load_visual_dataset(bad, "completion")
    assert "bad.jsonl:2: missing column(s) ['completion']" in str(error.value)


def test_evaluate_visual_scores_generations(llava, monkeypatch):
    processor = AutoProcessor.from_pretrained(llava["student"])
    model = AutoModelForImageTextToText.from_pretrained(llava["student"])
    result = visual.evaluate_visual(model, processor, n=6, seed=5)
    assert result.n == 6 and 0.0 <= result.reward <= 1.0
    # with the generations replaced by the right answers the score is exactly 1
    monkeypatch.setattr(
        visual, "generate_visual_responses", lambda m, p, items: [visual.respond(s.answer, True) for s in items]
    )
    assert visual.evaluate_visual(model, processor, n=6, seed=5).reward == 1.0


def test_evaluation_scenes_never_occur_in_the_training_data():
    train = {visual.scene_split(s) for s in visual.scenes(300, seed=0)}
    assert train == {"train"}
    training = set(visual.scenes(256, seed=0)) | set(visual.scenes(128, seed=1))  # write_visual_data's SFT and pairs
    test = visual.scenes(200, seed=0, split="test")
    assert {visual.scene_split(s) for s in test} == {"test"} and not training & set(test)
