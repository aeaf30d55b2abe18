"""Top-k + rest-bucket divergences from cached teacher signals (DCKD, docs/methods/dckd_adpa.md §3.2-§3.3; the
divergence family of docs/methods/kd.md).

The teacher-signal cache holds, per response token, the teacher's top-k ids and log-probs; the student's
probability of the same k ids plus one "rest" bin (all other tokens) makes a (K+1)-bin distribution. The
student's log-normaliser needs its full row, so the work runs through the shared `chunked_token_map`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from .divergence import chunked_token_map
from .divergences import Divergence, divergence_from_logprobs, divergence_params
from .reduction import Reduction, masked_mean

Mode = Literal["paper", "official"]
RowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Official clamps (official code, `load_input_and_target_probs_fast` + DCKD loss): probabilities in
# [1e-8, 1 - 1e-8], and student probabilities below 1e-7 raised to 1e-7 (DCKD only).
PROB_MIN, PROB_MAX, STUDENT_FLOOR = 1e-8, 1.0 - 1e-8, 1e-7


def check_topk_signals(
    student_logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, names: str
) -> None:
    """Raise unless ids/values are `[B, T, K]` over the student's `[B, T]`, and the masked ids are valid top-k ids.

    Ids must be ≥ 0 and distinct within a position; ids ≥ the student's V are allowed (padded teacher
    vocabulary) and go to the rest bucket. Unmasked positions are not inspected (they may hold padding).
    """
    id_name, value_name = names.split(",")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], found shape {tuple(student_logits.shape)}")
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [B, T] = {tuple(student_logits.shape[:2])}")
    if ids.dim() != 3 or ids.shape[:2] != mask.shape or values.shape != ids.shape:
        raise ValueError(
            f"{id_name} {tuple(ids.shape)} and {value_name} {tuple(values.shape)} must both be [B, T, K] with "
            f"[B, T] = {tuple(mask.shape)}"
        )
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{id_name} must be an integer tensor of token ids, found dtype {ids.dtype}")
    counted = ids[mask.bool()]
    if counted.numel() and counted.min() < 0:
        b, t = (ids.lt(0).any(-1) & mask.bool()).nonzero()[0].tolist()
        raise ValueError(f"{id_name} holds a negative token id at masked position (batch {b}, step {t})")
    ordered = counted.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    if repeated.any():
        b, t = mask.bool().nonzero()[repeated.nonzero()[0, 0]].tolist()
        raise ValueError(
            f"{id_name} repeats a token id at masked position (batch {b}, step {t}); top-k ids are distinct"
        )


def gather_topk(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows `logits [n, V]`, `ids [n, K]`: (log q at the ids, the exact log q of the rest bin, valid [n, K]).

    Ids ≥ V are invalid (their log q reads -inf); the rest bin is every token outside the valid ids, computed as
    logsumexp over those logits minus the full logsumexp (exact, unlike ln(1 − Σ q)); -inf when it is empty.
    """
    vocab = logits.shape[-1]
    valid = ids < vocab
    safe_ids = torch.where(valid, ids, 0)
    log_norm = logits.logsumexp(-1, keepdim=True)
    log_q = torch.where(valid, logits.gather(-1, safe_ids) - log_norm, float("-inf"))
    in_topk = torch.zeros_like(logits).scatter_add_(-1, safe_ids, valid.to(logits.dtype)) > 0
    rest_logits = logits.masked_fill(in_topk, float("-inf"))
    empty = in_topk.all(-1, keepdim=True)
    # an empty rest bin would give logsumexp(-inf…) whose backward is NaN: feed zeros there and mask after
    rest_lse = torch.where(empty, 0.0, rest_logits).logsumexp(-1, keepdim=True)
    log_q_rest = torch.where(empty, float("-inf"), rest_lse - log_norm).squeeze(-1)
    return log_q, log_q_rest, valid


def _paper_rows(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(K+1)-bin KL(teacher ‖ student) without clamps (§3.3); terms with zero teacher mass count 0 (0·ln 0 = 0)."""
    log_q, log_q_rest, valid = gather_topk(logits, ids)
    p = torch.where(valid, logprobs.exp(), 0.0)
    # the teacher rest is 1 − Σ p up to rounding: clamp at 0, and 0 when the ids cover the whole vocabulary
    rest_empty = valid.sum(-1) == logits.shape[-1]
    p_rest = torch.where(rest_empty, 0.0, (1.0 - p.sum(-1)).clamp(min=0.0))
    topk_terms = torch.where(p > 0, p * (logprobs - log_q), 0.0).sum(-1)
    rest_term = torch.where(p_rest > 0, p_rest * (torch.where(p_rest > 0, p_rest, 1.0).log() - log_q_rest), 0.0)
    return topk_terms + rest_term


def _official_rows(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(K+1)-bin KL with the official clamps and the 1e-7 student floor (§3.2); student rest = 1 − Σ q."""
    log_q, _, valid = gather_topk(logits, ids)
    q = log_q.exp()  # 0 at invalid ids, as the official extended-probability gather reads
    p = torch.where(valid, logprobs.exp(), 0.0)  # invalid ids' mass moves to the rest bin
    target = torch.cat([p, (1.0 - p.sum(-1, keepdim=True))], dim=-1).clamp(PROB_MIN, PROB_MAX)
    student = torch.cat([q, (1.0 - q.sum(-1, keepdim=True))], dim=-1).clamp(STUDENT_FLOOR, PROB_MAX)
    return (target * (target.log() - student.log())).sum(-1)


def topk_bins(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K+1)-bin log-probabilities `[n, K + 1]` of the student and the teacher: the K ids, then the rest bin.

    Student rest: exact, from the logits (`gather_topk`). Teacher rest: 1 − Σ p_topk in log space, ln(−expm1(lse))
    of the top-k log-probs, which keeps its digits when the top-k mass is near 1; clamped at 0 (a rounded cache can
    sum past 1), and 0 when the ids cover the whole vocabulary. Ids ≥ V read -inf on both sides.
    """
    log_q, log_q_rest, valid = gather_topk(logits, ids)
    log_p = torch.where(valid, logprobs, float("-inf"))
    rest_empty = valid.sum(-1, keepdim=True) == logits.shape[-1]
    p_rest = torch.where(rest_empty, 0.0, (-torch.expm1(log_p.logsumexp(-1, keepdim=True))).clamp(min=0.0))
    log_p_rest = torch.where(p_rest > 0, torch.where(p_rest > 0, p_rest, 1.0).log(), float("-inf"))
    return torch.cat([log_q, log_q_rest.unsqueeze(-1)], -1), torch.cat([log_p, log_p_rest], -1)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: Mode = "paper",
    chunk_size: int | None = None,
    reduction: Reduction = "token_mean",
    divergence: Divergence = "forward_kl",
    **params: float,
) -> torch.Tensor:
    """A divergence between teacher and student over the K teacher tokens plus one rest bucket
    (docs/methods/dckd_adpa.md §3; docs/methods/kd.md for the family).

    Shapes: `student_logits [B, T, V]`, `teacher_ids [B, T, K]` int, `teacher_logprobs [B, T, K]` (natural log),
    `mask [B, T]`. Default: DCKD's forward KL(teacher ‖ student). `paper` (§3.3): no clamps, exact rest log-mass;
    equals the full-vocabulary loss when K = V, for every `divergence` (same names and `params` as `kd_loss`,
    computed on the (K+1)-bin distributions of `topk_bins`: AKL's head/tail split sorts those bins, the rest bin
    among them; TAID's target is the softmax of (1 − t)·stopgrad(ln q) + t·ln p over the bins). `official`
    (§3.2, forward_kl only): P and Q clipped to [1e-8, 1 − 1e-8], Q floored at 1e-7, Q_rest = 1 − Σ q. Teacher
    ids ≥ V go to the rest bucket in both modes. No temperature: the cache holds the teacher at τ = 1. Reduced by
    `masked_mean(…, reduction)` (default: pooled token mean).
    """
    check_topk_signals(student_logits, teacher_ids, teacher_logprobs, mask, "teacher_ids,teacher_logprobs")
    rows = topk_rows(mode, divergence, divergence_params(divergence, params))
    values = chunked_token_map(rows, student_logits, teacher_ids, teacher_logprobs, mask=mask, chunk_size=chunk_size)
    return masked_mean(values, mask.bool(), reduction)


def topk_rows(mode: Mode, divergence: Divergence, resolved: dict[str, float]) -> RowFn:
    """The row function `(logits [n, V'], ids [n, K], logprobs [n, K]) -> [n]` of (mode, divergence), shared by
    `topk_kd_loss` and the fused form: DCKD's own forward-KL rows, or the divergence family on the (K+1) bins of
    `topk_bins` (`resolved`: the divergence's parameters from `divergence_params`)."""
    if mode not in ("paper", "official"):
        raise ValueError(f"unknown mode {mode!r}; expected paper or official")
    if mode == "official" and divergence != "forward_kl":
        raise ValueError(
            f"mode 'official' (the official DCKD code's clamped formula) only supports divergence forward_kl, found "
            f"{divergence!r}; use mode 'paper' for the other divergences"
        )
    if divergence == "forward_kl":  # DCKD's own rows, unchanged
        return _paper_rows if mode == "paper" else _official_rows

    def divergence_rows(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        log_q, log_p = topk_bins(logits, ids, logprobs)
        return divergence_from_logprobs(log_q, log_p, divergence, resolved)

    return divergence_rows
