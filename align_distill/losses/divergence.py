"""Chunked full-vocabulary divergences: the one place where per-position work over `[B, T, V]` is chunked.

Why chunk: at T=2048, V=49152 one float32 `[T, V]` tensor is 384 MiB, and a plain log-softmax KL keeps several
(two log-softmaxes, probabilities, products, their gradients). `chunked_token_map` gathers only the masked
positions, `chunk_size` rows at a time, upcasts that chunk to float32 and computes the per-position values *and*
their gradient with respect to the chunk right away (a forward-time gradient, as fused cross-entropy kernels
do), written into a zero tensor of the input's shape and dtype. No chunk's float32 intermediates outlive the
chunk, and the backward scales that tensor in place by the incoming gradient and returns it, with no
recomputation: the returned gradient is the only full-size buffer the loss adds.
Every full-vocabulary loss of `align_distill.losses` (kd, top-k, ADPA, AlignDistil) goes through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .divergences import Divergence, divergence_from_logprobs, divergence_params
from .reduction import Reduction, masked_mean

# Default chunk: about 2**19 elements per float32 intermediate (2 MiB), 10 rows at V=49152, 3 at V=152064. A chunk's
# autograd work keeps a few dozen such buffers alive at once; measured at V=49152, T=2048 (bench/loss_kernels.py):
# 2**20 → 0.26× the naive peak, 2**19 → 0.23×, 2**18 → 0.21× but ~1.3× slower from per-chunk overhead.
CHUNK_ELEMENTS = 1 << 19


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when an input already is (exact references and gradcheck run in float64)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def default_chunk_size(row_numel: int) -> int:
    """Rows per chunk so that one float32 intermediate of a chunk holds about `CHUNK_ELEMENTS` elements."""
    return max(1, CHUNK_ELEMENTS // max(1, row_numel))


class _TokenMap(torch.autograd.Function):
    """Autograd for `chunked_token_map`: per-row gradients are computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, fn, b_idx, t_idx, chunk_size, dtype, *tensors):  # type: ignore[override]
        differentiable = [i for i, x in enumerate(tensors) if x is not None and ctx.needs_input_grad[5 + i]]
        n = b_idx.numel()
        shape = next(x for x in tensors if x is not None).shape[:2]
        # The gradient is written straight into a zero tensor of the input's shape, which the backward scales in
        # place and returns: the only full-size buffer of the whole loss is the gradient it must return anyway.
        full_grads = [torch.zeros_like(tensors[i], memory_format=torch.contiguous_format) for i in differentiable]
        outputs: list[torch.Tensor] | None = None
        for start in range(0, max(n, 1), chunk_size):  # one (empty) pass when n == 0 to learn fn's outputs
            rows = slice(start, start + chunk_size)
            b, t = b_idx[rows], t_idx[rows]
            with torch.set_grad_enabled(bool(differentiable)):
                chunk = [None if x is None else _gather_rows(x, b, t, dtype) for x in tensors]
                for i in differentiable:
                    chunk[i].requires_grad_(True)
                result = fn(*chunk)
                result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
                for k, value in enumerate(result):
                    if value.shape != b.shape:
                        raise ValueError(
                            f"chunked_token_map: fn output {k} has shape {tuple(value.shape)}, expected one value "
                            f"per position ({b.numel()},)"
                        )
                if differentiable and result[0].requires_grad:
                    grads = torch.autograd.grad(result[0].sum(), [chunk[i] for i in differentiable], allow_unused=True)
                else:
                    grads = [None] * len(differentiable)
            if outputs is None:
                outputs = [torch.zeros(shape, dtype=value.dtype, device=value.device) for value in result]
            for out, value in zip(outputs, result):
                out[b, t] = value.detach()
            for full, grad in zip(full_grads, grads):
                if grad is not None:
                    full[b, t] = grad.to(full.dtype)
        ctx.differentiable = differentiable
        ctx.n_inputs = len(tensors)
        ctx.chunk_size = chunk_size
        ctx.applied = None  # the factor the stored rows were scaled by in place, once a backward did
        ctx.save_for_backward(b_idx, t_idx, *full_grads)
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values, *_aux_grads):  # type: ignore[override]
        b_idx, t_idx, *full_grads = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None] * ctx.n_inputs
        if grad_values is None:
            return (None,) * 5 + tuple(grads)
        scale = grad_values[b_idx, t_idx]  # [n], one factor per stored gradient row
        # Usual case (one backward, every row scaled by a nonzero factor): scale the stored gradient in place and
        # hand it over. A second backward through a retained graph (gradcheck, `retain_graph=True`), or a zero
        # factor that would destroy a row, gets a fresh tensor instead, rescaled from what is stored.
        in_place = ctx.applied is None and bool(torch.all(scale != 0) and torch.all(scale.isfinite()))
        ratio = scale if ctx.applied is None else scale / ctx.applied
        for i, full in zip(ctx.differentiable, full_grads):
            out = full if in_place else torch.zeros_like(full)
            target = out.data  # writes through `.data` leave the saved tensor's version counter alone
            for start in range(0, b_idx.numel(), ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                b, t = b_idx[rows], t_idx[rows]
                factor = ratio[rows].reshape(-1, *([1] * (full.dim() - 2)))
                target[b, t] = (full[b, t].to(factor.dtype) * factor).to(full.dtype)
            grads[i] = out
        if in_place:
            ctx.applied = scale
        return (None,) * 5 + tuple(grads)


def _gather_rows(x: torch.Tensor, b: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `x[b, t]` (a copy of the chunk only, whatever the strides of `x`), floats upcast to `dtype`."""
    rows = x.detach()[b, t]
    return rows.to(dtype) if rows.is_floating_point() else rows


def chunked_token_map(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    *tensors: torch.Tensor | None,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Apply a per-position `fn` to the masked positions of `[B, T, ...]` tensors, chunk by chunk.

    `fn` gets one chunk of each tensor as `[n, ...]` rows (floating tensors upcast to float32, float64 kept;
    `None` passed through) and returns `[n]` values, or a tuple whose first element is the differentiable value
    and the rest auxiliary `[n]` values (statistics, no gradient). `fn` must treat rows independently and use no
    tensor that requires grad other than its arguments. Returns `[B, T]` (or a tuple of them), zero at unmasked
    positions; the gradient flows to every input tensor that requires grad, in that tensor's dtype.
    `chunk_size` = rows per chunk; None picks `default_chunk_size` of the widest row.
    """
    if mask.dim() != 2:
        raise ValueError(f"chunked_token_map: mask must be [B, T], found shape {tuple(mask.shape)}")
    present = [x for x in tensors if x is not None]
    if not present:
        raise ValueError("chunked_token_map: expected at least one [B, T, ...] tensor, found none")
    for k, x in enumerate(tensors):
        if x is not None and x.shape[:2] != mask.shape:
            raise ValueError(
                f"chunked_token_map: tensor {k} has shape {tuple(x.shape)}, expected leading dims "
                f"{tuple(mask.shape)} (the mask's [B, T])"
            )
    if chunk_size is None:
        chunk_size = default_chunk_size(max(math.prod(x.shape[2:]) for x in present))
    if chunk_size < 1:
        raise ValueError(f"chunked_token_map: chunk_size must be a positive number of rows, found {chunk_size}")
    b_idx, t_idx = mask.bool().nonzero(as_tuple=True)
    outputs = _TokenMap.apply(fn, b_idx, t_idx, chunk_size, compute_dtype(*present), *tensors)
    return outputs[0] if len(outputs) == 1 else outputs


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: Divergence = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    **params: float,
) -> torch.Tensor:
    """Divergence `[...]` between the two softmax distributions over the last dim (plain, unchunked rows).

    The family and its parameters are those of `divergences.divergence_from_logprobs` (forward_kl, reverse_kl,
    jsd, skew_forward_kl, skew_reverse_kl, tvd, akl, taid). `jsd` is TRL's generalized JSD (GKD, arXiv 2306.13649
    Eq. 1; `trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`). Both logits are divided by `temperature`
    (no T² factor). `beta` keeps its historic place: forward_kl and reverse_kl (JSD's β = 0 and β = 1) ignore it.
    """
    resolved = divergence_params(divergence, _with_beta(divergence, beta, params))
    log_s = F.log_softmax(_finite(student_logits / temperature), dim=-1)
    log_t = F.log_softmax(_finite(teacher_logits / temperature), dim=-1)
    return divergence_from_logprobs(log_s, log_t, divergence, resolved)


def _with_beta(divergence: str, beta: float | None, params: dict[str, float]) -> dict[str, float]:
    """`params` plus the positional-era `beta`, which callers passed with every divergence before the family grew:
    the two plain KLs ignore it (as they always did); every other divergence but jsd rejects it."""
    if beta is None or divergence in ("forward_kl", "reverse_kl"):
        return params
    return {"beta": beta, **params}


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """-inf logits (a masked or padded vocabulary) → the dtype's lowest value: p = 0 and 0·(finite) = 0 in the KLs.

    One clamp is cheaper than guarding every product with `where`; NaN still propagates.
    """
    return logits.clamp(min=torch.finfo(logits.dtype).min)


def check_logits(student_logits: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, other_name: str) -> None:
    """Raise a clear error unless `student_logits`, `other` are `[B, T, V]` alike and `mask` is `[B, T]`."""
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], found shape {tuple(student_logits.shape)}")
    if other.shape != student_logits.shape:
        hint = ""
        if (
            other.dim() == 3
            and other.shape[:2] == student_logits.shape[:2]
            and other.shape[2] > student_logits.shape[2]
        ):
            hint = f" (padded vocabulary? slice {other_name}[..., :{student_logits.shape[2]}] first)"
        raise ValueError(
            f"{other_name} has shape {tuple(other.shape)}, expected the student's {tuple(student_logits.shape)}{hint}"
        )
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [B, T] = {tuple(student_logits.shape[:2])}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    divergence: Divergence = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    reduction: Reduction = "token_mean",
    **params: float,
) -> torch.Tensor:
    """Full-vocabulary distillation loss (docs/methods/kd.md; DCKD `paper` mode, docs/methods/dckd_adpa.md §3.3;
    LLaVA-MoD mimic KL).

    Shapes: `student_logits`, `teacher_logits` `[B, T, V]` (row t predicts response token t; a padded teacher
    head must be sliced to the student's V by the caller), `mask` `[B, T]`. `divergence` and its parameters
    (defaults): forward_kl, reverse_kl, jsd (`beta`=0.5), skew_forward_kl / skew_reverse_kl (`alpha`=0.1), tvd,
    akl (`mu`=0.5), taid (`taid_t`, required); see `divergences.divergence_from_logprobs`. A parameter the
    divergence does not take, or one outside [0, 1], is a ValueError (forward_kl and reverse_kl ignore `beta`, as
    they always did). Per-token values come from `chunked_token_map` (no full-size float32 work), reduced by
    `masked_mean(…, reduction)` (default: token mean pooled over the batch). Gradient flows to `student_logits`
    only if the teacher does not require grad (TAID's target holds a detached copy of the student).
    """
    check_logits(student_logits, teacher_logits, mask, "teacher_logits")
    resolved = divergence_params(divergence, _with_beta(divergence, beta, params))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, found {temperature}")

    def per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_s = F.log_softmax(_finite(student / temperature), dim=-1)
        log_t = F.log_softmax(_finite(teacher / temperature), dim=-1)
        return divergence_from_logprobs(log_s, log_t, divergence, resolved)

    values = chunked_token_map(per_token, student_logits, teacher_logits, mask=mask, chunk_size=chunk_size)
    return masked_mean(values, mask.bool(), reduction)
