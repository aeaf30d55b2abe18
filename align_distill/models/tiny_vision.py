"""Tiny LLaVA teacher and student built locally (no hub): a tiny CLIP vision tower, a 2-layer GELU projector and a
tiny Qwen2 language model, with a locally trained tokenizer that knows `<image>` and a `LlavaProcessor` on the PIL
CLIP image processor (torchvision is not needed).

Teacher and student share the tokenizer, the processor and the **same vision tower weights** (as LLaVA-MoD's
teacher and student share CLIP ViT-L/336); they differ in the language model (`teacher` / `student` presets of
`models.tiny`). Images are 32×32 with 8×8 patches: 16 patch tokens per image (the CLS token is dropped,
`vision_feature_select_strategy="default"`), features from the penultimate layer (`vision_feature_layer=-2`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from align_distill.synthetic.visual import visual_corpus

from .tiny import tiny_text_config, train_tiny_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
IMAGE_TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2

# ChatML whose message content may be a string or a list of parts ({"type": "image"} / {"type": "text"}), as TRL's
# vision collators produce; an image part renders as the `<image>` placeholder the processor expands.
CHATML_VISION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tiny_vision_tokenizer(corpus: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """`train_tiny_tokenizer` plus the `<image>` special token and the list-content chat template."""
    tokenizer = train_tiny_tokenizer(corpus, vocab_size=vocab_size)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHATML_VISION_TEMPLATE
    return tokenizer


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """LlavaProcessor: PIL CLIP image processor at 32×32 (resize + centre crop, CLIP normalisation)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHATML_VISION_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )


def build_tiny_llava(
    tokenizer: PreTrainedTokenizerFast, preset: str = "student", seed: int = 0, max_position_embeddings: int = 256
) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA (CLIP tower + projector + Qwen2 of `preset`), fp32."""
    text_config = tiny_text_config(tokenizer, preset, "qwen2", max_position_embeddings)
    config = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_tiny_llava_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build `processor/`, `teacher/` and `student/` under `out_dir` (each model folder also holds the processor).

    The corpus is the coloured-shapes task's, so the vocabulary fits its data.
    """

    out = Path(out_dir)
    tokenizer = train_tiny_vision_tokenizer(visual_corpus())
    processor = build_tiny_processor(tokenizer)
    processor.save_pretrained(out / "processor")
    teacher = build_tiny_llava(tokenizer, "teacher", seed=seed)
    student = build_tiny_llava(tokenizer, "student", seed=seed + 1)
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())  # one shared "CLIP"
    paths = {"processor": out / "processor"}
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(out / name, safe_serialization=True)
        processor.save_pretrained(out / name)
        paths[name] = out / name
    return paths
