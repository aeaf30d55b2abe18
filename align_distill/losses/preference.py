"""LLaVA-MoD stage 2: preference distillation with the frozen teacher as the reference model.

docs/methods/llava_mod.md §5. Inputs are summed response log-probabilities `[B]` (see `reduction.sequence_logps`,
`average=False`) of the student policy and of the teacher on the same chosen / rejected answers. With
c = log π_s(y_w) − log π_T(y_w) and r = log π_s(y_l) − log π_T(y_l):

- `sigmoid` (DPO, project default): per pair −log σ(β (c − r)).
- `kto_pair` (the released script): z_w = max(0, mean_batch c), z_l = max(0, mean_batch r) — batch means, *not*
  detached, so the loss depends on the micro-batch — and the mean over the 2B terms
  {1 − σ(β (c_i − z_l))} ∪ {1 − σ(β (z_w − r_i))}.

Because the reference is the teacher, not the student's initialisation, the loss is not ln 2 at step 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PreferenceLossType = Literal["sigmoid", "kto_pair"]
PairReduction = Literal["mean", "sum", "none"]


def teacher_ref_preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    teacher_chosen_logps: torch.Tensor,
    teacher_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: PreferenceLossType = "sigmoid",
    reduction: PairReduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-referenced DPO / KTO-pair loss; returns `(loss, chosen_rewards, rejected_rewards)` like TRL.

    All four inputs are `[B]`. Rewards are β·c and β·r, detached (they are for logging, as in TRL).
    `reduction="none"` gives a per-pair loss `[B]`; for `kto_pair` that is the mean of the pair's two terms, so
    that its mean equals the `"mean"` reduction (the mean over all 2B terms).
    """
    shapes = {
        "policy_chosen_logps": policy_chosen_logps.shape,
        "policy_rejected_logps": policy_rejected_logps.shape,
        "teacher_chosen_logps": teacher_chosen_logps.shape,
        "teacher_rejected_logps": teacher_rejected_logps.shape,
    }
    if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1:
        found = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        raise ValueError(f"teacher_ref_preference_loss expects four [B] tensors of one shape; got {found}")

    # at least float32 (bf16 log-probs of long answers lose the small differences), float64 kept for gradcheck
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    chosen_logratios = policy_chosen_logps.to(dtype) - teacher_chosen_logps.to(dtype)
    rejected_logratios = policy_rejected_logps.to(dtype) - teacher_rejected_logps.to(dtype)

    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "kto_pair":
        # KL proxies from the micro-batch, clamped at 0 and kept in the graph (TRL's former `kto_pair`).
        chosen_kl = chosen_logratios.mean().clamp(min=0)
        rejected_kl = rejected_logratios.mean().clamp(min=0)
        chosen_terms = 1 - torch.sigmoid(beta * (chosen_logratios - rejected_kl))
        rejected_terms = 1 - torch.sigmoid(beta * (chosen_kl - rejected_logratios))
        per_pair = 0.5 * (chosen_terms + rejected_terms)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'kto_pair'")

    if reduction == "mean":
        loss = per_pair.mean()
    elif reduction == "sum":
        loss = per_pair.sum()
    elif reduction == "none":
        loss = per_pair
    else:
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return loss, chosen_rewards, rejected_rewards
