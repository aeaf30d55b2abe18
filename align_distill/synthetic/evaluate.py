"""Greedy-decoding evaluation of a model on the synthetic task with the ground-truth reward."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .task import evaluation_prompts, reward


@dataclass(frozen=True)
class Evaluation:
    reward: float
    capability: float
    preference: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: list[str],
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> list[str]:
    """Greedy responses to plain prompts, each wrapped as one user turn with the chat template."""
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation needs the prompt flush against the new tokens
    responses: list[str] = []
    try:
        for start in range(0, len(prompt_texts), batch_size):
            chunk = prompt_texts[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in chunk
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return responses


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n: int | None = None,
    seed: int = 0,
    split: str = "test",
    batch_size: int = 64,
) -> Evaluation:
    """Mean ground-truth reward, capability accuracy and preference rate (greedy) over the first `n` (default all)
    distinct prompts of `seed`'s `split`: "validation" to tune, "test" to report. Both are disjoint from every
    training prompt by construction (`task.split_of`)."""
    prompt_texts = evaluation_prompts(split, seed, n)
    responses = generate_responses(model, tokenizer, prompt_texts, batch_size=batch_size)
    rewards = [reward(p, r) for p, r in zip(prompt_texts, responses)]
    count = len(prompt_texts)
    return Evaluation(
        reward=sum(r.total for r in rewards) / count,
        capability=sum(r.capability for r in rewards) / count,
        preference=sum(r.preference for r in rewards) / count,
        n=count,
    )
