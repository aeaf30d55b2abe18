"""How good a draft is for a target: α on target- and draft-generated text, block efficiency for γ = 1…8, and the
reference sampler's measured acceptance and wall-clock speed-up (docs/methods/speculative.md, "Evaluation")."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align_distill.losses.acceptance import acceptance_rate

from .metrics import block_efficiency
from .sampler import SpeculativeStats, autoregressive_sample, causal_lm, speculative_sample


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> list[int]:
    """A prompt as token ids: chat messages through the chat template; a string as one user turn when the tokenizer
    has a template (as the synthetic task's evaluation does), else as plain text."""
    if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eos_token_id: int | None,
    pad_token_id: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Sampled completions (ending at EOS when drawn) from `model`, left-padded batches, seeded."""
    torch.manual_seed(seed)
    completions: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in chunk], device=model.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=attention,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        for row in out[:, width:].tolist():
            completions.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return completions


@torch.no_grad()
def text_acceptance(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[int]],
    temperature: float,
    batch_size: int = 16,
) -> float:
    """α = mean over completion tokens of Σ_v min(p, q) at the positions that predict them (exact distributions)."""
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows = [p + c for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size])]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompts[start : start + batch_size], completions[start : start + batch_size])):
            mask[i, len(p) - 1 : len(p) - 1 + len(c)] = True  # the logits that predict completion tokens
        if not mask.any():
            continue
        target_logits = target(input_ids=ids.to(target.device)).logits.float().cpu()
        draft_logits = draft(input_ids=ids.to(draft.device)).logits.float().cpu()
        total += float(acceptance_rate(target_logits, draft_logits, mask, temperature=temperature, reduction="sum"))
        count += int(mask.sum())
    return total / count if count else float("nan")


@dataclass
class SamplerTiming:
    stats: SpeculativeStats
    speculative_s: float
    autoregressive_s: float

    @property
    def speedup(self) -> float:
        return self.autoregressive_s / self.speculative_s


def time_sampler(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompts: list[list[int]],
    gamma: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eos_token_id: int | None,
) -> SamplerTiming:
    """Run the reference sampler and plain target sampling on the same prompts; wall-clock of each, and counts."""
    stats = SpeculativeStats()
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        _, run = speculative_sample(
            causal_lm(target), causal_lm(draft), prompt, gamma, max_new_tokens, generator, temperature, eos_token_id
        )
        stats.add(run)
    speculative_s = time.perf_counter() - started
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        autoregressive_sample(causal_lm(target), prompt, max_new_tokens, generator, temperature, eos_token_id)
    return SamplerTiming(stats, speculative_s, time.perf_counter() - started)


def evaluate_draft(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompts: list[list[int]],
    target_completions: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eos_token_id: int | None,
    pad_token_id: int,
    max_gamma: int = 8,
    timing_prompts: int = 0,
    gamma: int = 4,
) -> dict:
    """Every number `align-distill evaluate speculative` reports for one draft (a JSON-ready dict).

    `alpha_target_text` is α on the target's samples: the text speculative decoding actually produces, so it sets
    the i.i.d. block efficiencies; `alpha_draft_text` is α on the draft's own samples (DistillSpec's on-policy view).
    """
    own = sample_completions(draft, prompts, max_new_tokens, temperature, seed + 1, eos_token_id, pad_token_id)
    alpha = text_acceptance(target, draft, prompts, target_completions, temperature)
    result: dict = {
        "alpha_target_text": alpha,
        "alpha_draft_text": text_acceptance(target, draft, prompts, own, temperature),
        "block_efficiency": {str(g): block_efficiency(min(max(alpha, 0.0), 1.0), g) for g in range(1, max_gamma + 1)},
    }
    if timing_prompts:
        timing = time_sampler(
            target, draft, prompts[:timing_prompts], gamma, max_new_tokens, temperature, seed, eos_token_id
        )
        result["sampler"] = {
            "gamma": gamma,
            "prompts": min(timing_prompts, len(prompts)),
            **timing.stats.as_dict(),
            "predicted_block_efficiency": block_efficiency(min(max(alpha, 0.0), 1.0), gamma),
            "speculative_s": timing.speculative_s,
            "autoregressive_s": timing.autoregressive_s,
            "speedup": timing.speedup,
        }
    return result


def evaluate_drafts(
    target_path: str | os.PathLike,
    drafts: dict[str, str | os.PathLike],
    texts: list[str | list[dict]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_gamma: int = 8,
    timing_prompts: int = 0,
    gamma: int = 4,
    dtype: str = "float32",
) -> dict[str, dict]:
    """{name: `evaluate_draft`} for every draft folder against the target on `texts` (the target's samples are
    drawn once and shared). A draft with another vocabulary size than the target is a UserError."""
    from align_distill.errors import UserError
    from align_distill.models import load_model, load_tokenizer

    tokenizer, target = load_tokenizer(target_path), load_model(target_path, dtype=dtype)
    prompts = [prompt_token_ids(tokenizer, text) for text in texts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    target_text = sample_completions(target, prompts, max_new_tokens, temperature, seed, eos, pad)
    results = {}
    for name, path in drafts.items():
        draft = load_model(path, dtype=dtype)
        if draft.config.vocab_size != target.config.vocab_size:
            raise UserError(
                f"`drafts`: {path} has a vocabulary of {draft.config.vocab_size}, the target "
                f"{target.config.vocab_size}; a draft needs the target's tokenizer (e.g. a shrunk copy of the target)"
            )
        results[name] = evaluate_draft(
            target,
            draft,
            prompts,
            target_text,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            eos_token_id=eos,
            pad_token_id=pad,
            max_gamma=max_gamma,
            timing_prompts=timing_prompts,
            gamma=gamma,
        )
    return results
