"""Speculative decoding's acceptance rate from the target's and the draft's rows (docs/methods/speculative.md).

With target p and draft q at one position, the standard verification rule accepts a drafted token with probability
α = Σ_v q(v)·min(1, p(v)/q(v)) = Σ_v min(p(v), q(v)) = 1 − TVD(p, q) (Leviathan et al. 2023, Chen et al. 2023;
DistillSpec's objective). Full-vocabulary rows go through the shared `chunked_token_map`, like every other loss.

From top-k target signals (the teacher-signal cache: the target's K ids and log-probs, the draft's full row) the
sum splits into the K ids, known exactly, and the rest R (every other id), known only in total on each side:
P_R = 1 − Σ_K p and Q_R = 1 − Σ_K q. Over R, 0 ≤ Σ_R min(p, q) ≤ min(Σ_R p, Σ_R q) = min(P_R, Q_R), and both ends
are reachable (p's rest mass on ids where q is 0, or proportional to q's), so α lies in
[Σ_K min(p, q), Σ_K min(p, q) + min(P_R, Q_R)] and no tighter interval holds without more of p.
"""

from __future__ import annotations

import torch

from .divergence import check_logits, chunked_token_map
from .reduction import Reduction, masked_mean
from .topk import check_topk_signals


def _overlap(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v min(p(v), q(v)) per row, from normalised log-probabilities `[n, V]`."""
    return torch.minimum(log_p, log_q).exp().sum(-1)


def acceptance_rate(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "token_mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Expected acceptance α = Σ_v min(p(v), q(v)) of a drafted token, reduced over `mask`.

    `target_logits`, `draft_logits`: `[B, T, V]` at the same positions (the logits that predict each token);
    `mask`: `[B, T]` positions to count; both logits are divided by `temperature` (the sampling temperature of
    speculative decoding). `reduction` as `masked_mean` (`none` gives α per position `[B, T]`, 0 where masked
    out). No gradient: this is a measurement (train with `divergence: tvd`, whose value is 1 − α).
    """
    check_logits(draft_logits, target_logits, mask, "target_logits")

    def per_row(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
        return _overlap((target / temperature).log_softmax(-1), (draft / temperature).log_softmax(-1))

    with torch.no_grad():
        values = chunked_token_map(
            per_row, target_logits.detach(), draft_logits.detach(), mask=mask, chunk_size=chunk_size
        )
    return masked_mean(values, mask, reduction)


def topk_acceptance_bounds(
    draft_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reduction: Reduction = "token_mean",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bound of α when only the target's top-k is known (the module docstring derives them).

    `draft_logits`: `[B, T, V]`; `target_ids`, `target_logprobs`: `[B, T, K]` (the teacher-signal cache's
    layout; ids ≥ V are a padded target vocabulary, where the draft's probability is 0). Returns
    (Σ_K min(p, q), Σ_K min(p, q) + min(1 − Σ_K p, 1 − Σ_K q)), each reduced like `acceptance_rate`; with K = V
    the two coincide with the exact α.
    """
    check_topk_signals(draft_logits, target_ids, target_logprobs, mask, "target_ids,target_logprobs")
    vocab = draft_logits.shape[-1]

    def per_row(draft: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        log_q = draft.log_softmax(-1)
        inside = ids < vocab
        log_q_k = torch.where(inside, log_q.gather(-1, ids.clamp(max=vocab - 1)), -torch.inf)
        known = _overlap(logprobs, log_q_k)
        rest = torch.minimum(1 - logprobs.exp().sum(-1), 1 - log_q_k.exp().sum(-1)).clamp(min=0)
        return known, known + rest

    with torch.no_grad():
        low, high = chunked_token_map(
            per_row, draft_logits.detach(), target_ids, target_logprobs.detach(), mask=mask, chunk_size=chunk_size
        )
    return masked_mean(low, mask, reduction), masked_mean(high, mask, reduction)
