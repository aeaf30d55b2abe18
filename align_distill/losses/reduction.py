"""Masked reductions and per-sequence log-likelihoods shared by every loss.

Conventions (all losses): `logits` are `[B, T, V]` aligned so that position t predicts response token t,
`mask` is a `[B, T]` bool of the response tokens that count. Computation happens in float32 whatever the
input dtype, so bf16 inputs give the same result as fp32 inputs up to the inputs' own rounding.
"""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["token_mean", "sequence_mean", "sum", "none"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "token_mean") -> torch.Tensor:
    """Reduce per-token `values [B, T]` over `mask [B, T]`.

    - `token_mean`: mean over every counted token of the batch (pooled), the project default;
    - `sequence_mean`: mean over sequences of each sequence's token mean (sequences with no token are skipped);
    - `sum`: sum over counted tokens; `none`: `values` with uncounted positions set to 0.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask_f = mask.to(values.dtype)
    masked = values * mask_f
    if reduction == "none":
        return masked
    if reduction == "sum":
        return masked.sum()
    if reduction == "token_mean":
        return masked.sum() / mask_f.sum().clamp(min=1.0)
    if reduction == "sequence_mean":
        counts = mask_f.sum(dim=-1)
        per_sequence = masked.sum(dim=-1) / counts.clamp(min=1.0)
        has_tokens = counts > 0
        return per_sequence[has_tokens].sum() / has_tokens.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; expected token_mean, sequence_mean, sum or none")


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability `[B, T]` of each label token under `logits [B, T, V]`, computed in float32.

    Uses logsumexp rather than a full log_softmax so only one `[B, T, V]` float32 copy is made.
    """
    logits = logits.float()
    picked = torch.gather(logits, dim=-1, index=labels.long().clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Sum (or, with `average`, length-normalised mean) of response-token log-probs per sequence: `[B]`."""
    per_token = token_logps(logits, labels) * mask.float()
    total = per_token.sum(dim=-1)
    if average:
        return total / mask.float().sum(dim=-1).clamp(min=1.0)
    return total
