"""CycleAlign's white-box objective: PRO's list-wise ranking loss plus SFT on the top response.

docs/methods/cyclealign.md §7. For one prompt with a ranked list y^1 ≻ … ≻ y^n and scores s_k (length-normalised
log-likelihoods, §4, with gradients):

- rank-only (§7.1, default): L_rank = Σ_{k=1}^{n−1} [ −s_k + log Σ_{i≥k} exp(s_i) ] (Plackett–Luce NLL);
- with rewards r (§7.2, official PRO): Δ_{k,i} = r_k − r_i (i > k), Δ_k^+ = max_{i>k} Δ_{k,i} and
  L_rank = Σ_k [ −s_k Δ_k^+ + log( exp(s_k Δ_k^+) + Σ_{i>k} exp(s_i Δ_{k,i}) ) ];
- total (§7.3): L = L_rank + w · L_SFT with L_SFT = −log π(y^1) **summed** over tokens and, by default,
  w = β_sft · (n − 1)² (β_sft = 0.05, PRO's code). Prompts with n < 2 carry no ranking and are skipped.
"""

from __future__ import annotations

from typing import Literal

import torch

ListReduction = Literal["mean", "sum", "none"]


def _check_inputs(seq_logps: torch.Tensor, lengths: torch.Tensor, ranking: torch.Tensor, valid: torch.Tensor) -> None:
    shapes = {"seq_logps": seq_logps.shape, "lengths": lengths.shape, "ranking": ranking.shape, "valid": valid.shape}
    if len(set(shapes.values())) != 1 or seq_logps.dim() != 2:
        found = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        raise ValueError(f"pro_loss expects [B, N] tensors of one shape; got {found}")
    if ranking.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ranking must hold candidate indices (int64); got dtype {ranking.dtype}")
    n_candidates = ranking.shape[1]
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        row = int((valid[:, 1:] & ~valid[:, :-1]).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"valid must mark a prefix of each ranking (best first); row {row} is {valid[row].tolist()}")
    out_of_range = valid & ((ranking < 0) | (ranking >= n_candidates))
    if bool(out_of_range.any()):
        row = int(out_of_range.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"ranking row {row} {ranking[row].tolist()} has indices outside [0, {n_candidates})")
    picked = torch.zeros(ranking.shape[0], n_candidates, dtype=torch.long, device=ranking.device)
    picked.scatter_add_(1, ranking.long().clamp(0, n_candidates - 1), valid.long())
    if bool((picked > 1).any()):
        row = int((picked > 1).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"ranking row {row} {ranking[row].tolist()} lists a candidate more than once")
    too_short = valid & (lengths <= 0)
    if bool(too_short.any()):
        row, slot = (int(x) for x in too_short.nonzero()[0])
        raise ValueError(f"ranked candidate of row {row} has length {lengths[row, slot].item()}; expected ≥ 1 token")


def pro_loss(
    seq_logps: torch.Tensor,
    lengths: torch.Tensor,
    ranking: torch.Tensor,
    valid: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    sft_beta: float = 0.05,
    sft_weight: float | None = None,
    length_normalise: bool = True,
    reduction: ListReduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PRO loss over B prompts with up to N candidates each; returns `(loss, rank_losses [B], sft_nlls [B])`.

    - `seq_logps [B, N]`: summed response log-probs of each candidate (candidate order), with gradients;
    - `lengths [B, N]`: response token counts; scores are `seq_logps / lengths` (`length_normalise=False`: sums);
    - `ranking [B, N]` long: candidate indices best first; slot k of row b is used iff `valid[b, k]`;
    - `valid [B, N]` bool, a prefix per row (default all True): n_b = valid[b].sum() ranked candidates;
    - `rewards [B, N]` (candidate order) switches on §7.2's reward-gap temperatures;
    - SFT weight per prompt: `sft_weight` if given, else `sft_beta · (n_b − 1)²`.

    `rank_losses` and `sft_nlls` (−log π(y^1), unweighted) are per prompt, for logging. `reduction`: `mean` over
    prompts with n_b ≥ 2 (0 if none), `sum`, or `none` (per-prompt total `[B]`, 0 for skipped prompts).
    """
    if valid is None:
        valid = torch.ones_like(ranking, dtype=torch.bool)
    valid = valid.bool()
    _check_inputs(seq_logps, lengths, ranking, valid)
    if rewards is not None and rewards.shape != seq_logps.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} must match seq_logps {tuple(seq_logps.shape)} ([B, N])")

    dtype = torch.promote_types(seq_logps.dtype, torch.float32)
    index = ranking.long().clamp(min=0)
    logps = seq_logps.to(dtype).gather(1, index)  # [B, N], best first
    scores = logps / lengths.to(dtype).gather(1, index).clamp(min=1) if length_normalise else logps
    n = valid.sum(dim=1)  # [B]
    n_slots = ranking.shape[1]

    # temperatures T[b, k, i] multiplying s_i in step k's softmax over the candidates i ≥ k still in the list
    later = torch.ones(n_slots, n_slots, dtype=torch.bool, device=scores.device).triu(diagonal=1)  # i > k
    in_list = valid[:, None, :] & later[None]  # [B, k, i]
    if rewards is None:
        temperatures = torch.ones(scores.shape[0], n_slots, n_slots, dtype=dtype, device=scores.device)
    else:
        r = rewards.to(dtype).gather(1, index)
        gaps = (r[:, :, None] - r[:, None, :]).masked_fill(~in_list, float("-inf"))  # Δ_{k,i}, i > k
        top_gap = gaps.amax(dim=2)  # Δ_k^+ (−inf for the last slot, whose step is not counted)
        eye = torch.eye(n_slots, dtype=torch.bool, device=scores.device)
        temperatures = torch.where(eye[None], top_gap[:, :, None], gaps).nan_to_num(neginf=0.0)
    terms = scores[:, None, :] * temperatures  # [B, k, i]
    step_members = in_list | torch.eye(n_slots, dtype=torch.bool, device=scores.device)[None]
    log_partition = terms.masked_fill(~step_members, float("-inf")).logsumexp(dim=2)  # [B, k]
    own = torch.diagonal(terms, dim1=1, dim2=2)  # s_k · T_{k,k}
    # step k counts iff a later candidate exists in the list (k < n_b − 1)
    counted_steps = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
    rank_losses = ((log_partition - own) * counted_steps).sum(dim=1)

    sft_nlls = -logps[:, 0]
    has_ranking = n >= 2
    weight = (
        torch.full_like(rank_losses, float(sft_weight))
        if sft_weight is not None
        else sft_beta * (n.to(dtype) - 1).clamp(min=0) ** 2
    )
    per_prompt = torch.where(has_ranking, rank_losses + weight * sft_nlls, torch.zeros_like(rank_losses))

    if reduction == "mean":
        loss = per_prompt.sum() / has_ranking.sum().clamp(min=1)
    elif reduction == "sum":
        loss = per_prompt.sum()
    elif reduction == "none":
        loss = per_prompt
    else:
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")
    return loss, rank_losses, sft_nlls
