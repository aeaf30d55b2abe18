"""ADPA: advantage-guided distillation from a DPO teacher and its reference (docs/methods/dckd_adpa.md §4).

Every token a of the DPO teacher's top-k at state s_t gets an advantage A_t(a); the student maximises its
expected advantage Σ_a q_t(a)·A_t(a) on fixed, student-generated responses (ℓ_t = −that, minimised).
"""

from __future__ import annotations

import torch

from .divergence import chunked_token_map
from .reduction import Reduction, masked_mean
from .topk import PROB_MAX, PROB_MIN, Mode, check_topk_signals, gather_topk

# Official advantage floor (official code, `merge_logits_adpa_dataset.py`): probabilities below 1e-7 count as 1e-7.
ADVANTAGE_PROB_FLOOR = 1e-7


def adpa_advantages(
    dpo_ids: torch.Tensor,
    dpo_logprobs: torch.Tensor,
    ref_ids: torch.Tensor,
    ref_logprobs: torch.Tensor,
    beta: float = 1.0,
    mode: Mode = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages `(ids, values)`, both `[B, T, K]`, on the DPO teacher's top-k ids `dpo_ids` (§4.2, §4.4).

    Inputs: top-k ids and natural-log probabilities of the DPO teacher `[B, T, K]` and of the reference `[B, T, K']`.
    - `paper`: A = β·(ln π_dpo − ln π_ref). Exact when the reference was gathered at the DPO ids
      (`ref_ids == dpo_ids`, what the signals job stores). Otherwise ln π_ref is looked up in the reference's own
      top-k; an id missing there falls back to the reference's smallest top-k log-prob, the largest value a token
      outside its top-k can have, so A is then a lower bound of the true advantage.
    - `official`: no β (must be 1.0), A = ln(max(p_dpo, 1e-7) / b) with b = max(p_ref, 1e-7) when the id is in
      the reference's top-k, else the fallback rule b = max(min of the DPO top-k probs, 1e-7).
    Computed in float32 (float64 kept); ids are returned unchanged.
    """
    if dpo_ids.shape != dpo_logprobs.shape or ref_ids.shape != ref_logprobs.shape or dpo_ids.dim() != 3:
        raise ValueError(
            "expected dpo_ids/dpo_logprobs [B, T, K] and ref_ids/ref_logprobs [B, T, K'], found "
            f"{tuple(dpo_ids.shape)}/{tuple(dpo_logprobs.shape)} and "
            f"{tuple(ref_ids.shape)}/{tuple(ref_logprobs.shape)}"
        )
    if ref_ids.shape[:2] != dpo_ids.shape[:2]:
        raise ValueError(f"dpo [B, T] = {tuple(dpo_ids.shape[:2])} but reference [B, T] = {tuple(ref_ids.shape[:2])}")
    dtype = torch.float64 if torch.float64 in (dpo_logprobs.dtype, ref_logprobs.dtype) else torch.float32
    dpo_lp, ref_lp = dpo_logprobs.detach().to(dtype), ref_logprobs.detach().to(dtype)
    if ref_ids.shape == dpo_ids.shape and torch.equal(ref_ids, dpo_ids):
        found, ref_at = torch.ones_like(dpo_ids, dtype=torch.bool), ref_lp
    else:
        match = dpo_ids.unsqueeze(-1) == ref_ids.unsqueeze(-2)  # [B, T, K, K']
        found = match.any(-1)
        ref_at = torch.where(match, ref_lp.unsqueeze(-2), float("-inf")).amax(-1)
    if mode == "paper":
        fallback = ref_lp.amin(-1, keepdim=True).expand_as(ref_at)
        return dpo_ids, beta * (dpo_lp - torch.where(found, ref_at, fallback))
    if mode != "official":
        raise ValueError(f"unknown mode {mode!r}; expected paper or official")
    if beta != 1.0:
        raise ValueError(
            f"official ADPA advantages carry no β (dckd_adpa §4.2; the scale is adpa_weight); found beta={beta}"
        )
    p_dpo = dpo_lp.exp().clamp(min=ADVANTAGE_PROB_FLOOR)
    fallback = dpo_lp.exp().amin(-1, keepdim=True).clamp(min=ADVANTAGE_PROB_FLOOR).expand_as(p_dpo)
    p_ref = torch.where(found, ref_at.exp().clamp(min=ADVANTAGE_PROB_FLOOR), fallback)
    return dpo_ids, (p_dpo / p_ref).log()


def _paper_rows(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """ℓ_t = −Σ_i q(i)·A(i) over the valid ids (§4.4); ids ≥ V have q = 0."""
    log_q, _, valid = gather_topk(logits, ids)
    return -torch.where(valid, log_q.exp() * values, 0.0).sum(-1)


def _official_rows(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """ℓ_t = −Σ Q̃·T̃ over K+1 bins (§4.3): T = (A, Σ A of ids ≥ V), Q = (q, 1 − Σ q), both clipped to (1e-8, 1−1e-8)."""
    log_q, _, valid = gather_topk(logits, ids)
    q = log_q.exp()
    target_rest = torch.where(valid, 0.0, values).sum(-1, keepdim=True)
    target = torch.cat([torch.where(valid, values, 0.0), target_rest], dim=-1).clamp(PROB_MIN, PROB_MAX)
    student = torch.cat([q, 1.0 - q.sum(-1, keepdim=True)], dim=-1).clamp(PROB_MIN, PROB_MAX)
    return -(student * target).sum(-1)


def adpa_loss(
    student_logits: torch.Tensor,
    adv_ids: torch.Tensor,
    adv_values: torch.Tensor,
    mask: torch.Tensor,
    mode: Mode = "paper",
    chunk_size: int | None = None,
    reduction: Reduction = "token_mean",
) -> torch.Tensor:
    """ADPA loss: minus the student's expected advantage (docs/methods/dckd_adpa.md §4.3-§4.4).

    Shapes: `student_logits [B, T, V]`, `adv_ids`/`adv_values [B, T, K]` from `adpa_advantages`, `mask [B, T]`.
    `paper`: ℓ_t = −Σ_i q_t(i)·A_t(i), raw advantages; tokens outside the ids have A = 0; with K = V it is the
    full-vocabulary form. `official`: advantages clipped to (1e-8, 1 − 1e-8) as a (K+1)-bin target and the student
    bins clipped likewise (no 1e-7 floor). Reduced by `masked_mean(…, reduction)` (default: pooled token mean).
    """
    check_topk_signals(student_logits, adv_ids, adv_values, mask, "adv_ids,adv_values")
    if mode == "paper":
        rows = _paper_rows
    elif mode == "official":
        rows = _official_rows
    else:
        raise ValueError(f"unknown mode {mode!r}; expected paper or official")
    values = chunked_token_map(rows, student_logits, adv_ids, adv_values, mask=mask, chunk_size=chunk_size)
    return masked_mean(values, mask.bool(), reduction)
