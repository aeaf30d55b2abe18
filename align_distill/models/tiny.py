"""Tiny tokenizer and tiny Llama/Qwen2 models built locally — for tests, examples and the quickstart.

Nothing here touches a hub: the tokenizer is a byte-level BPE trained on a given corpus, the models are random
initialisations from small configs. Teacher and student share the tokenizer, so every same-tokenizer method works.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from align_distill.synthetic import task_corpus

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, as used by Qwen2: the assistant turn ends with <|im_end|>, which is the EOS token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyPreset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


# head_dim is 32 everywhere: a size every attention backend (incl. vLLM's CPU kernels) supports.
PRESETS: dict[str, TinyPreset] = {
    "teacher": TinyPreset(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
    "student": TinyPreset(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192),
    "micro": TinyPreset(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64),
}


def train_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and wrap it with ChatML special tokens and chat template.

    Byte-level so that any text round-trips (spaces, newlines, unseen characters).
    """
    specials = [PAD_TOKEN, IM_START, IM_END]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START],
        padding_side="right",
        model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_text_config(
    tokenizer: PreTrainedTokenizerFast,
    preset: str = "student",
    arch: str = "qwen2",
    max_position_embeddings: int = 256,
    **extra: Any,
) -> PretrainedConfig:
    """The config of a tiny causal LM of `arch` ("llama" or "qwen2") sized by `preset` over `tokenizer`'s vocabulary
    (also the language model inside the tiny LLaVA)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; expected one of {sorted(PRESETS)}")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown tiny arch {arch!r}; expected 'llama' or 'qwen2'")
    size = PRESETS[preset]
    return AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    preset: str = "student",
    arch: str = "qwen2",
    seed: int = 0,
    max_position_embeddings: int = 256,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `arch` ("llama" or "qwen2") sized by `preset`, fp32."""
    config = tiny_text_config(tokenizer, preset, arch, max_position_embeddings, torch_dtype="float32")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Save model (safetensors) and tokenizer side by side, so the folder loads like any hub checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_models(
    out_dir: str | Path,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    arch: str = "qwen2",
    teacher_preset: str = "teacher",
    student_preset: str = "student",
) -> dict[str, Path]:
    """Build tokenizer, teacher and student under `out_dir` (`tokenizer/`, `teacher/`, `student/`).

    Without a corpus, the synthetic task's corpus is used so the vocabulary fits the quickstart's data.
    """
    if corpus is None:
        corpus = task_corpus()
    out = Path(out_dir)
    tokenizer = train_tiny_tokenizer(corpus)
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    teacher = build_tiny_causal_lm(tokenizer, teacher_preset, arch=arch, seed=seed)
    student = build_tiny_causal_lm(tokenizer, student_preset, arch=arch, seed=seed + 1)
    return {
        "tokenizer": tokenizer_dir,
        "teacher": save_tiny(teacher, tokenizer, out / "teacher"),
        "student": save_tiny(student, tokenizer, out / "student"),
    }
