"""A reference speculative sampler (Leviathan et al. 2023; Chen et al. 2023): correctness first, no KV cache.

Each round the draft proposes γ tokens x_1..x_γ from q; one target call scores all of them; x_i is accepted with
probability min(1, p(x_i)/q(x_i)); at the first rejection a token is drawn from norm(max(0, p − q)) and the round
ends; when all γ are accepted a bonus token is drawn from p at the next position. Every emitted token then has the
target's distribution exactly. Models are given as functions from token ids `[1, L]` to logits `[1, L, V]` (a
transformers causal LM's forward, `causal_lm`, or a hand-built table in tests); both must share one vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def causal_lm(model: torch.nn.Module) -> LogitsFn:
    """A transformers causal LM as a `LogitsFn` (a full forward per call: the sampler keeps no cache)."""

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(model.device)).logits.float().cpu()

    return logits


@dataclass
class SpeculativeStats:
    """Counts of one or more speculative runs.

    `verified`: drafted tokens the target judged (a round stops at its first rejection, so later drafts of that
    round are never judged); `accepted` of them; `target_calls` rounds; `tokens` emitted (accepted, resampled and
    bonus tokens, before truncation to `max_new_tokens`).
    """

    drafted: int = 0
    verified: int = 0
    accepted: int = 0
    target_calls: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        """Measured α: accepted / verified, the per-token acceptance the i.i.d. model assumes."""
        return self.accepted / self.verified if self.verified else float("nan")

    @property
    def block_efficiency(self) -> float:
        """Measured tokens per target call."""
        return self.tokens / self.target_calls if self.target_calls else float("nan")

    def add(self, other: SpeculativeStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "acceptance": self.acceptance, "block_efficiency": self.block_efficiency}


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits.double() / temperature).softmax(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def speculative_sample(
    target: LogitsFn,
    draft: LogitsFn,
    prompt_ids: list[int],
    gamma: int,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
) -> tuple[list[int], SpeculativeStats]:
    """Sample up to `max_new_tokens` tokens after `prompt_ids` with the target's distribution at `temperature`.

    Returns the new tokens (ending at `eos_token_id` when it is drawn) and the run's counts. All randomness comes
    from `generator` (seeded by the caller), so a run is reproducible.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be at least 1 drafted token per round, found {gamma}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling), found {temperature}")
    sequence = list(prompt_ids)
    new: list[int] = []
    stats = SpeculativeStats()
    while len(new) < max_new_tokens and (not new or new[-1] != eos_token_id):
        proposals, draft_rows = [], []
        for _ in range(gamma):
            ids = torch.tensor([sequence + proposals])
            row = _probs(draft(ids)[0, -1], temperature)
            draft_rows.append(row)
            proposals.append(_draw(row, generator))
            if proposals[-1] == eos_token_id:
                break
        stats.drafted += len(proposals)
        # one target call scores every proposal and the bonus position: rows L−1 … L−1+len(proposals)
        target_logits = target(torch.tensor([sequence + proposals]))[0, len(sequence) - 1 :]
        target_rows = _probs(target_logits, temperature)
        stats.target_calls += 1
        emitted: list[int] = []
        for i, token in enumerate(proposals):
            p, q = target_rows[i], draft_rows[i]
            stats.verified += 1
            if float(torch.rand((), generator=generator, dtype=torch.float64)) < min(1.0, float(p[token] / q[token])):
                stats.accepted += 1
                emitted.append(token)
                if token == eos_token_id:
                    break
                continue
            residual = (p - q).clamp(min=0)
            emitted.append(_draw(residual if residual.sum() > 0 else p, generator))
            break
        else:  # every proposal accepted (an accepted EOS breaks out above): the bonus token
            emitted.append(_draw(target_rows[len(proposals)], generator))
        stats.tokens += len(emitted)
        sequence += emitted
        new += emitted
    if eos_token_id is not None and eos_token_id in new:
        new = new[: new.index(eos_token_id) + 1]
    return new[:max_new_tokens], stats


@torch.no_grad()
def autoregressive_sample(
    target: LogitsFn,
    prompt_ids: list[int],
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
) -> list[int]:
    """Plain sampling from the target, one full forward per token: the baseline of the sampler's speed-up (the
    same forward style, no cache, so the ratio measures speculation and not caching)."""
    sequence, new = list(prompt_ids), []
    while len(new) < max_new_tokens and (not new or new[-1] != eos_token_id):
        token = _draw(_probs(target(torch.tensor([sequence]))[0, -1], temperature), generator)
        sequence.append(token)
        new.append(token)
    return new
