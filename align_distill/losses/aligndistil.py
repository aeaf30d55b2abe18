"""AlignDistil: token-adaptive logit extrapolation teacher + β_t-weighted reverse KL (docs/methods/aligndistil.md).

Teacher (§4, released method): z* = z_dpo + α_t·(z_dpo − z_rev) with α_t = tvd_scale·TVD_t + ε, where
TVD_t = Σ_v |p_dpo − p_rev| (code convention, no ½; `tvd_half=True` for the paper's ½, r_paper = 2·tvd_scale).
Loss (§5): β_t·KL(π_θ ‖ π*) with β_t = β0/α_t, over the full vocabulary, chunked by `chunked_token_map`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .divergence import check_logits, chunked_token_map, compute_dtype
from .reduction import Reduction, masked_mean

Variant = Literal["adaptive", "contrastive", "theorem1"]

# α "at a bound" (stats only): TVD within this fraction of its range [0, tvd_max] from either end.
BOUND_TOLERANCE = 1e-3


def aligndistil_teacher(
    dpo_logits: torch.Tensor,
    rev_logits: torch.Tensor | None,
    tvd_scale: float = 10.0,
    eps: float = 1e-3,
    tvd_half: bool = False,
    variant: Variant = "adaptive",
    ratio: float | None = None,
    ref_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs `[..., V]` and extrapolation coefficient α `[...]` (docs/methods/aligndistil.md §3-§4, §8.1).

    - `adaptive` (default; official `aligndistil`): α = tvd_scale·TVD(p_dpo, p_rev) + eps,
      z* = z_dpo + α·(z_dpo − z_rev).
    - `contrastive` (`theorem1_contrast`): fixed α = `ratio` = β0/β, z* = z_dpo + ratio·(z_dpo − z_rev).
    - `theorem1`: z* = ratio·z_dpo + (1 − ratio)·z_ref with the SFT reference's `ref_logits`; α = ratio.
    Computed in float32 (float64 kept) under no_grad: α and π* are constants for the student.
    """
    if variant not in ("adaptive", "contrastive", "theorem1"):
        raise ValueError(f"unknown variant {variant!r}; expected adaptive, contrastive or theorem1")
    if variant != "adaptive" and ratio is None:
        raise ValueError(f"variant {variant!r} needs a fixed ratio β0/β, found ratio=None")
    other_name, other = ("ref_logits", ref_logits) if variant == "theorem1" else ("rev_logits", rev_logits)
    if other is None:
        raise ValueError(f"variant {variant!r} needs {other_name}, found None")
    if other.shape != dpo_logits.shape:
        raise ValueError(
            f"{other_name} has shape {tuple(other.shape)}, expected dpo_logits' {tuple(dpo_logits.shape)}"
        )
    with torch.no_grad():
        dtype = compute_dtype(dpo_logits, other)
        dpo, other = dpo_logits.to(dtype), other.to(dtype)
        if variant == "adaptive":
            tvd = (dpo.softmax(-1) - other.softmax(-1)).abs().sum(-1) * (0.5 if tvd_half else 1.0)
            alpha = tvd_scale * tvd + eps
            teacher = dpo + alpha.unsqueeze(-1) * (dpo - other)
        else:
            alpha = torch.full(dpo.shape[:-1], float(ratio), dtype=dtype, device=dpo.device)
            teacher = dpo + ratio * (dpo - other) if variant == "contrastive" else ratio * dpo + (1 - ratio) * other
        return F.log_softmax(teacher, dim=-1), alpha


def aligndistil_loss(
    student_logits: torch.Tensor,
    dpo_logits: torch.Tensor,
    rev_logits: torch.Tensor | None,
    mask: torch.Tensor,
    beta0: float = 0.1,
    tvd_scale: float = 10.0,
    eps: float = 1e-3,
    tvd_half: bool = False,
    variant: Variant = "adaptive",
    ratio: float | None = None,
    ref_logits: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: Reduction = "sequence_mean",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AlignDistil loss: Σ β_t·KL(π_θ ‖ π*) reduced over the mask (docs/methods/aligndistil.md §5, §8.1).

    Shapes: `student_logits`, `dpo_logits`, `rev_logits` (and `ref_logits` for `theorem1`) `[B, T, V]`, rows
    already aligned to the scored response tokens (textbook alignment is the caller's mask; §5.3), `mask [B, T]`.
    β_t = beta0/α_t (for the fixed-ratio variants α = ratio, so β_t = β). Default reduction `sequence_mean` = the
    official `--reward_len_norm`: mean over sequences of each sequence's token mean. Gradient only to the student.
    With `return_stats`, also returns detached token means over the mask: `alpha`, `beta`, `kl`, and the
    fractions of tokens whose α sits at a bound of [eps, tvd_scale·tvd_max + eps] (TVD within
    `BOUND_TOLERANCE`·tvd_max of 0 or of tvd_max; tvd_max = 2, or 1 with `tvd_half`): `alpha_at_lower`,
    `alpha_at_upper`, `alpha_at_bounds` (always 0 for the fixed-ratio variants, whose α has no bounds).
    """
    check_logits(student_logits, dpo_logits, mask, "dpo_logits")
    other = ref_logits if variant == "theorem1" else rev_logits
    if other is not None:
        check_logits(student_logits, other, mask, "ref_logits" if variant == "theorem1" else "rev_logits")

    def per_token(student: torch.Tensor, dpo: torch.Tensor, other: torch.Tensor | None):
        rev, ref = (None, other) if variant == "theorem1" else (other, None)
        teacher_logprobs, alpha = aligndistil_teacher(dpo, rev, tvd_scale, eps, tvd_half, variant, ratio, ref)
        log_student = F.log_softmax(student, dim=-1)
        kl = (log_student.exp() * (log_student - teacher_logprobs)).sum(-1)
        return (beta0 / alpha) * kl, alpha, kl.detach()

    weighted, alpha, kl = chunked_token_map(
        per_token, student_logits, dpo_logits, other, mask=mask, chunk_size=chunk_size
    )
    mask = mask.bool()
    loss = masked_mean(weighted, mask, reduction)
    if not return_stats:
        return loss
    return loss, aligndistil_stats(alpha, kl, mask, beta0, tvd_scale, eps, tvd_half, variant)


def aligndistil_stats(
    alpha: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta0: float,
    tvd_scale: float,
    eps: float,
    tvd_half: bool,
    variant: Variant,
) -> dict[str, torch.Tensor]:
    """The statistics of `aligndistil_loss(return_stats=True)` from per-position α and KL(π_θ ‖ π*) (any shape
    of `mask`): one definition for the logits and the fused forms."""
    mask = mask.bool()
    alpha, kl = alpha.detach(), kl.detach()
    tvd_max = 1.0 if tvd_half else 2.0
    tvd = (alpha - eps) / tvd_scale
    adaptive = variant == "adaptive"
    at_lower = (tvd <= BOUND_TOLERANCE * tvd_max) & adaptive
    at_upper = (tvd >= (1 - BOUND_TOLERANCE) * tvd_max) & adaptive
    return {
        "alpha": masked_mean(alpha, mask),
        "beta": masked_mean(torch.where(mask, beta0 / alpha.clamp(min=torch.finfo(alpha.dtype).tiny), 0.0), mask),
        "kl": masked_mean(kl, mask),
        "alpha_at_lower": masked_mean(at_lower.to(alpha.dtype), mask),
        "alpha_at_upper": masked_mean(at_upper.to(alpha.dtype), mask),
        "alpha_at_bounds": masked_mean((at_lower | at_upper).to(alpha.dtype), mask),
    }
