"""Fused LM-head distillation losses: from final hidden states and head weights, never a `[N, V]` logits tensor.

Why: at V = 151936 one float32 row of logits per token is 0.6 MB; the logits forms of `kd_loss` & co. need the
student's and the teacher's full logits plus a logits-shaped gradient. Here the heads are projected one
`[ROW_CHUNK, VOCAB_TILE]` tile at a time, three passes over the tiles (the same structure as TRL's
`_chunked_divergence_loss`, for every divergence of `divergences.py`):
- A: online log-sum-exp of each head's logits (log-normalisers, and the statistics a loss needs: TAID's mixture,
  the top-k rest bin);
- B: the per-position values, each tile through the same row functions as the logits forms (the divergences of
  `divergences.py` sum over the vocabulary, so the sum over tiles of a tile's value is the row's value), and
  G = Σ_v ∂D/∂ln q_v, the row statistic the log-softmax's gradient needs (∂D/∂z_v = ∂D/∂ln q_v − q_v·G);
- C: the gradient, vocabulary tile outer and row chunk inner, so that each tile of the head's gradient is
  accumulated in float32 once and written once; `∂/∂hidden` and `∂/∂weight` accumulate tile by tile.
The gradient is computed in the forward (as `chunked_token_map` and fused cross-entropy kernels do) with the
reduction's per-position weights known up front: the backward only scales it, and under ZeRO-3 the head weight is
gathered once per step, around the loss call and its backward (`distributed.gathered_head`).
AKL's head (a sort of the teacher's row) and TVD++'s reward mean need the whole row: for them a tile spans the
vocabulary and the row chunk shrinks to the same element budget (still no `[N, V]`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .adpa import _official_rows as adpa_official_rows
from .adpa import _paper_rows as adpa_paper_rows
from .aligndistil import Variant, aligndistil_stats
from .divergence import compute_dtype
from .divergences import Divergence, divergence_from_logprobs, divergence_params, finite, kl
from .reduction import Reduction, masked_mean
from .topk import Mode, check_topk_signals, topk_rows

# Tile of the vocabulary and rows per chunk: 256 × 2048 float32 = 2 MiB per tile-sized intermediate. At V = 49152,
# T = 2048, H = 576, fp32 on CPU (the `fused` worker of bench/fused_losses.py), 512 rows × 2048 gave 248 MiB extra
# peak against 191 MiB here, at no measurable speed-up: the tiles' autograd temporaries (and what the allocator keeps
# of them) are what the peak holds besides the gradients.
VOCAB_TILE = 2048
ROW_CHUNK = 256
# 16-bit heads get half-width tiles: the tiles' float32 temporaries do not shrink with the inputs, their gradients do.
# At V = 49152, T = 2048, H = 576 in bf16, 2048-wide tiles held 2.33× the inputs' gradients at peak (extra over the
# inputs, bench/fused_losses.json), 1024-wide 1.91× (bench/fused_losses_bf16.json), within the goal of 2×.
VOCAB_TILE_16BIT = 1024
# G = Σ_v ∂D/∂ln q_v where it is a constant: forward KL's is −Σ p = −1 (pass B then needs no autograd).
KNOWN_G = {"forward_kl": -1.0}
# Divergences whose tile values add up to the row's (TAID with its mixture's normaliser from pass A). Any other
# (AKL, TVD++, and any divergence added to `DIVERGENCE_PARAMS` later) gets whole-row tiles: exact by construction.
TILEWISE = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "taid")


@dataclass(frozen=True)
class Head:
    """One LM head: logits = softcap(scale · (hidden @ weightᵀ + bias)) / temperature (Gemma-2 soft-capping:
    c·tanh(x / c); Cohere's logit scale), the order of TRL's `_chunked_divergence_loss`."""

    hidden: torch.Tensor  # [n, H] the counted positions only
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def linear(self, rows: slice, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Pre-transform logits `[r, end − start]` of the rows, in the compute dtype."""
        out = self.hidden[rows].to(dtype) @ self.weight[start:end].to(dtype).T
        return out if self.bias is None else out + self.bias[start:end].to(dtype)

    def transform(self, linear: torch.Tensor) -> torch.Tensor:
        z = linear * self.scale if self.scale != 1.0 else linear
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature if self.temperature != 1.0 else z

    @torch.no_grad()
    def logits(self, rows: slice, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Logits tile `[r, end − start]`, a constant (passes A and B; pass C builds its own autograd leaf)."""
        return self.transform(self.linear(rows, start, end, dtype))


def _tiles(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _fold_lse(state: tuple[torch.Tensor, torch.Tensor] | None, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online log-sum-exp over the last dim: (running max, running Σ exp(z − max)), one more tile folded in."""
    tile_max = z.amax(-1)
    if state is None:
        top = tile_max
        total = torch.zeros_like(top)
    else:
        top = torch.maximum(state[0], tile_max)
        total = state[1] * torch.exp(state[0] - top).nan_to_num(0.0)  # -inf − -inf: nothing folded yet
    safe = torch.where(torch.isfinite(top), top, 0.0)
    return top, total + torch.exp(z - safe.unsqueeze(-1)).sum(-1)


def _lse(state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    top, total = state
    return torch.where(torch.isfinite(top), top, 0.0) + total.log()


@dataclass
class _Plan:
    """Shapes and sizes of one fused call: n counted rows, vocabulary V, tile sizes, compute dtype."""

    rows: int
    vocab: int
    vocab_tile: int
    row_chunk: int
    dtype: torch.dtype
    device: torch.device

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def row_chunks(self) -> list[slice]:
        return [slice(a, b) for a, b in _tiles(self.rows, self.row_chunk)]

    def vocab_tiles(self) -> list[tuple[int, int]]:
        return _tiles(self.vocab, self.vocab_tile)


def _gradient_pass(
    plan: _Plan, student: Head, needs: tuple[bool, bool, bool], objective: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Pass C: ∂(Σ objective)/∂(hidden, weight, bias) of the student's head, tile by tile.

    `objective(z, rows, start, end)` gets the student's logits tile (a function of the tile's pre-transform
    logits, which are the autograd leaf) and returns the scalar whose gradient w.r.t. z is that tile's ∂loss/∂z.
    Vocabulary tiles outer: a tile of ∂weight is summed over every row in float32 and written once.
    """
    need_hidden, need_weight, need_bias = needs
    grad_hidden = plan.zeros(*student.hidden.shape) if need_hidden else None
    grad_weight = torch.zeros_like(student.weight) if need_weight else None
    grad_bias = torch.zeros_like(student.bias) if need_bias and student.bias is not None else None
    for start, end in plan.vocab_tiles():
        weight = student.weight[start:end].detach().to(plan.dtype)
        tile_weight = plan.zeros(*weight.shape) if need_weight else None
        tile_bias = plan.zeros(end - start) if grad_bias is not None else None
        for rows in plan.row_chunks():
            hidden = student.hidden[rows].detach().to(plan.dtype)
            with torch.enable_grad():
                linear = hidden @ weight.T
                if student.bias is not None:
                    linear = linear + student.bias[start:end].detach().to(plan.dtype)
                linear = linear.detach().requires_grad_(True)
                (d_linear,) = torch.autograd.grad(objective(student.transform(linear), rows, start, end), linear)
            if grad_hidden is not None:
                grad_hidden[rows].addmm_(d_linear, weight)
            if tile_weight is not None:
                tile_weight.addmm_(d_linear.T, hidden)
            if tile_bias is not None:
                tile_bias += d_linear.sum(0)
        if grad_weight is not None:
            grad_weight[start:end] = tile_weight.to(grad_weight.dtype)
        if grad_bias is not None:
            grad_bias[start:end] = tile_bias.to(grad_bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class _Scaled(torch.autograd.Function):
    """A scalar loss whose gradients were computed in the forward: the backward scales them by the incoming one."""

    @staticmethod
    def forward(ctx, loss, grads, *inputs):  # type: ignore[override]
        ctx.grads = grads
        ctx.applied = None
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        # Usual case: one backward; scale in place and hand the tensors over. Only aliases stay here, so that
        # autograd can make a leaf's .grad of the tensor itself rather than a head-sized copy. A retained graph's
        # second backward (gradcheck) rescales what the aliases hold: the first one's gradient, as long as nothing
        # has changed that .grad in place since.
        scale = grad_loss.to(torch.float64).item()
        grads, ctx.grads = ctx.grads, None
        first = ctx.applied is None and scale != 0.0
        out = []
        for grad in grads:
            if grad is None:
                out.append(None)
            elif first:
                out.append(grad.mul_(scale) if scale != 1.0 else grad)
            else:
                out.append(grad * (scale if ctx.applied is None else scale / ctx.applied))
        ctx.grads = tuple(None if g is None else g.detach() for g in (out if first else grads))
        if first:
            ctx.applied = scale
        del grads
        return None, None, *out


def _finish(
    values: torch.Tensor, weights: torch.Tensor, student: Head, grads: tuple[torch.Tensor | None, ...]
) -> torch.Tensor:
    """The reduced loss Σ w·values, differentiable w.r.t. the student's (hidden, weight, bias) through `grads`."""
    loss = (weights * values).sum()
    hidden_grad, weight_grad, bias_grad = grads
    if hidden_grad is not None:
        hidden_grad = hidden_grad.to(student.hidden.dtype)
    inputs = [student.hidden, student.weight, student.bias if student.bias is not None else torch.zeros(())]
    return _Scaled.apply(loss, (hidden_grad, weight_grad, bias_grad), *inputs)


def _needs(student: Head) -> tuple[bool, bool, bool]:
    if not torch.is_grad_enabled():
        return False, False, False
    bias = student.bias is not None and student.bias.requires_grad
    return student.hidden.requires_grad, student.weight.requires_grad, bias


def _reduction_weights(mask: torch.Tensor, reduction: Reduction, dtype: torch.dtype) -> torch.Tensor:
    """Per-position weights `[B, T]` of `masked_mean(…, reduction)`: it is linear in the values, so they are its
    gradient (one definition of every reduction, in reduction.py)."""
    if reduction == "none":
        raise ValueError(
            "fused losses reduce inside (their gradient is computed in the forward): reduction 'none' is not "
            "supported; use token_mean, sequence_mean or sum, or the logits form"
        )
    probe = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        (weights,) = torch.autograd.grad(masked_mean(probe, mask.bool(), reduction), probe)
    return weights


def _rows(hidden: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    if hidden.dim() != 3 or hidden.shape[:2] != mask.shape:
        raise ValueError(
            f"{name} must be [B, T, H] with [B, T] = the mask's {tuple(mask.shape)}, found {tuple(hidden.shape)}"
        )
    return hidden[mask.bool()]


def _head(hidden: torch.Tensor, weight: torch.Tensor, name: str, **transform) -> Head:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name} weight must be [V, H] with H = {hidden.shape[-1]} (its hidden states' width), "
            f"found {tuple(weight.shape)}"
        )
    return Head(hidden, weight, **transform)


def _plan(
    student: Head, dtype: torch.dtype, vocab_tile: int | None, row_chunk: int | None, whole_row: bool = False
) -> _Plan:
    """Tiles of a call on the student's counted rows: `vocab_tile`, `row_chunk` or the defaults (see `TILEWISE`)."""
    rows, vocab, device = student.hidden.shape[0], student.weight.shape[0], student.hidden.device
    tile = vocab_tile or (VOCAB_TILE if student.weight.element_size() >= 4 else VOCAB_TILE_16BIT)
    chunk = row_chunk or ROW_CHUNK
    if tile < 1 or chunk < 1:
        raise ValueError(f"vocab_tile and row_chunk must be positive, found {tile} and {chunk}")
    if whole_row:  # the same element budget per tile, spread over whole rows
        chunk, tile = max(1, (tile * chunk) // vocab) if row_chunk is None else chunk, vocab
    return _Plan(rows, vocab, min(tile, max(vocab, 1)), chunk, dtype, device)


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    divergence: Divergence = "forward_kl",
    *,
    temperature: float = 1.0,
    reduction: Reduction = "token_mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_tile: int | None = None,
    row_chunk: int | None = None,
    **params: float,
) -> torch.Tensor:
    """`kd_loss` from hidden states: the same value and gradient, without the `[B, T, V]` logits.

    Shapes: `student_hidden [B, T, H_s]`, `student_weight [V, H_s]`, `teacher_hidden [B, T, H_t]`,
    `teacher_weight [V, H_t]` (a padded teacher head sliced to the student's V by the caller), `mask [B, T]`.
    Logits = softcap(scale·(hidden @ weightᵀ + bias)) / temperature per head (`*_softcap` is Gemma-2's
    `final_logit_softcapping`). `divergence` and `params` as `kd_loss` (every divergence of `DIVERGENCE_PARAMS`);
    `reduction` as `masked_mean` except `none`. The gradient flows to the student's hidden states, weight and
    bias (the teacher is a constant). `vocab_tile` / `row_chunk`: tile shape (defaults `VOCAB_TILE`, `ROW_CHUNK`).
    """
    resolved = divergence_params(divergence, params)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, found {temperature}")
    s_rows, t_rows = _rows(student_hidden, mask, "student_hidden"), _rows(teacher_hidden, mask, "teacher_hidden")
    student = _head(
        s_rows,
        student_weight,
        "student",
        bias=student_bias,
        scale=student_logit_scale,
        softcap=student_softcap,
        temperature=temperature,
    )
    teacher = _head(
        t_rows.detach(),
        teacher_weight.detach(),
        "teacher",
        bias=None if teacher_bias is None else teacher_bias.detach(),
        scale=teacher_logit_scale,
        softcap=teacher_softcap,
        temperature=temperature,
    )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight has V = {teacher_weight.shape[0]}, the student's {student_weight.shape[0]}:"
            " slice a padded teacher head to the student's vocabulary first"
        )
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    whole_row = divergence not in TILEWISE
    plan = _plan(student, dtype, vocab_tile, row_chunk, whole_row)
    weights = _reduction_weights(mask, reduction, dtype)[mask.bool()]
    taid_t = resolved.get("taid_t")

    # Pass A: log-normalisers (and TAID's mixture (1 − t)·z_s + t·z_t, whose softmax is TAID's target r).
    lse_s, lse_t, lse_mix = (plan.zeros(plan.rows) for _ in range(3))
    for rows in plan.row_chunks():
        states: list = [None, None, None]  # running (max, Σ exp) of the student, the teacher, TAID's mixture
        for start, end in plan.vocab_tiles():
            z_s, z_t = student.logits(rows, start, end, dtype), teacher.logits(rows, start, end, dtype)
            states[0], states[1] = _fold_lse(states[0], z_s), _fold_lse(states[1], z_t)
            if taid_t is not None:
                states[2] = _fold_lse(states[2], (1 - taid_t) * z_s + taid_t * z_t)
        lse_s[rows], lse_t[rows] = _lse(states[0]), _lse(states[1])
        if taid_t is not None:
            lse_mix[rows] = _lse(states[2])

    def tile_value(z_s: torch.Tensor, rows: slice, start: int, end: int) -> torch.Tensor:
        """The tile's share `[r]` of each row's divergence, from the student's logits tile."""
        log_q = z_s - lse_s[rows].unsqueeze(-1)
        z_t = teacher.logits(rows, start, end, dtype)
        if taid_t is not None:  # r = softmax((1 − t)·stopgrad(z_s) + t·z_t): the tile of the global softmax
            log_r = finite((1 - taid_t) * z_s.detach() + taid_t * z_t - lse_mix[rows].unsqueeze(-1))
            return kl(log_r, finite(log_q))
        return divergence_from_logprobs(log_q, z_t - lse_t[rows].unsqueeze(-1), divergence, resolved)

    return _divergence_passes(student, plan, weights, lse_s, tile_value, KNOWN_G.get(divergence))


def _divergence_passes(
    student: Head,
    plan: _Plan,
    weights: torch.Tensor,
    lse_s: torch.Tensor,
    tile_value: Callable[[torch.Tensor, slice, int, int], torch.Tensor],
    known_g: float | None = None,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Passes B and C of a divergence whose row value is the sum of `tile_value(z_s, rows, start, end)` over the
    vocabulary tiles (z_s: the student's logits tile; `lse_s`: its log-normalisers from pass A); returns the loss
    Σ weights·values with its gradient. `values` (zeros `[n]`, optional) receives the per-row values."""
    # Pass B: values and G = Σ_v ∂D/∂ln q_v per row. With a known G and a gradient to compute, pass C (which
    # projects every tile anyway) adds up the values instead, and pass B is skipped.
    values = plan.zeros(plan.rows) if values is None else values
    g_sum = plan.zeros(plan.rows)
    needs = _needs(student)
    values_in_c = any(needs) and known_g is not None
    if known_g is not None:
        g_sum.fill_(known_g)
    for rows in plan.row_chunks() if not values_in_c else []:
        for start, end in plan.vocab_tiles():
            z_s = student.logits(rows, start, end, plan.dtype)
            if any(needs):
                with torch.enable_grad():
                    z_s.requires_grad_(True)
                    part = tile_value(z_s, rows, start, end)
                    (g,) = torch.autograd.grad(part.sum(), z_s)
                g_sum[rows] += g.sum(-1)
            else:
                with torch.no_grad():
                    part = tile_value(z_s, rows, start, end)
            values[rows] += part.detach()

    grads: tuple = (None, None, None)
    if any(needs):

        def objective(z_s: torch.Tensor, rows: slice, start: int, end: int) -> torch.Tensor:
            # w·(D − G·Σ_v q_v) with ln q = z − stopgrad(lse): its z-gradient is w·(∂D/∂ln q − q·G), the chain rule
            # through the log-softmax
            log_q = z_s - lse_s[rows].unsqueeze(-1)
            w = weights[rows]
            part = tile_value(z_s, rows, start, end)
            if values_in_c:
                values[rows] += part.detach()
            return (w * part).sum() - (w * g_sum[rows] * log_q.exp().sum(-1)).sum()

        grads = _gradient_pass(plan, student, needs, objective)
    return _finish(values, weights, student, grads)


def _row_reduce(plan: _Plan, tile_fn: Callable[[slice, int, int], torch.Tensor], lse: bool) -> torch.Tensor:
    """`[n]` per row over the vocabulary tiles of `tile_fn(rows, start, end)` (a `[r, end − start]` tile): its
    log-sum-exp (`lse`) or its sum."""
    out = plan.zeros(plan.rows)
    for rows in plan.row_chunks():
        state = None
        for start, end in plan.vocab_tiles():
            tile = tile_fn(rows, start, end)
            if lse:
                state = _fold_lse(state, tile)
            else:
                out[rows] += tile.sum(-1)
        if lse:
            out[rows] = _lse(state)
    return out


def _compact_loss(
    student: Head,
    ids: torch.Tensor,
    signal: torch.Tensor,
    weights: torch.Tensor,
    plan: _Plan,
    rows_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A top-k loss of the logits forms (`rows_fn(logits, ids, signal) -> [n]`, which reads the logits only through
    `topk.gather_topk`) from the student's head, on a compact row per position instead of `[n, V]`.

    The compact row is (z at the K ids, ln Σ_{v ∉ ids} e^z): its log-normaliser is the full row's and its last
    entry is exactly the rest bin's log-mass, so `gather_topk` on it with the ids renumbered 0..K−1 (ids ≥ V → K + 1,
    invalid there too) gives the same log-probabilities. Pass A folds the rest bin's log-sum-exp and picks the ids'
    logits tile by tile; the row function runs on `[n, K + 1]` with autograd; pass C spreads its gradient back:
    ∂/∂z_v = dc_k at the k-th id, dc_rest·e^(z_v − rest) elsewhere. With K ≥ V (the rest bin can be empty) the
    compact row is the full row, no larger than the ids themselves.
    """
    dtype, k = plan.dtype, ids.shape[-1]
    whole = k >= plan.vocab
    width = plan.vocab if whole else k + 1
    compact = plan.zeros(plan.rows, width).fill_(float("-inf"))  # ids ≥ V keep -inf: no mass

    def in_tile(rows: slice, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tile-local index of each id, clamped; whether the id lies in the tile; tile mask of the ids)."""
        local = ids[rows] - start
        inside = (local >= 0) & (local < end - start)
        safe = local.clamp(0, end - start - 1)
        hit = plan.zeros(local.shape[0], end - start).scatter_add_(-1, safe, inside.to(dtype)) > 0
        return safe, inside, hit

    rest_lse = plan.zeros(plan.rows)
    for rows in plan.row_chunks():
        state = None
        for start, end in plan.vocab_tiles():
            z = student.logits(rows, start, end, dtype)
            if whole:
                compact[rows, start:end] = z
                continue
            safe, inside, hit = in_tile(rows, start, end)
            compact[rows, :k] = torch.where(inside, z.gather(-1, safe), compact[rows, :k])
            state = _fold_lse(state, z.masked_fill(hit, float("-inf")))
        if not whole:
            rest_lse[rows] = _lse(state)
    if not whole:
        compact[:, k] = rest_lse
    compact_ids = (
        ids if whole else torch.where(ids < plan.vocab, torch.arange(k, device=ids.device).expand_as(ids), k + 1)
    )

    needs = _needs(student)
    with torch.set_grad_enabled(any(needs)):
        leaf = compact.requires_grad_(any(needs))
        values = rows_fn(leaf, compact_ids, signal)
        d_compact = torch.autograd.grad((weights * values).sum(), leaf)[0] if any(needs) else None
    grads: tuple = (None, None, None)
    if d_compact is not None:

        def objective(z: torch.Tensor, rows: slice, start: int, end: int) -> torch.Tensor:
            if whole:
                return (d_compact[rows, start:end] * z).sum()
            safe, inside, hit = in_tile(rows, start, end)
            at_ids = torch.zeros_like(z).scatter_add_(-1, safe, torch.where(inside, d_compact[rows, :k], 0.0))
            rest = (z.masked_fill(hit, float("-inf")) - rest_lse[rows].unsqueeze(-1)).exp()
            return (at_ids * z).sum() + (d_compact[rows, k].unsqueeze(-1) * rest).sum()

        grads = _gradient_pass(plan, student, needs, objective)
    return _finish(values.detach(), weights, student, grads)


def _topk_form(
    rows_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    names: str,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    ids: torch.Tensor,
    signal: torch.Tensor,
    mask: torch.Tensor,
    reduction: Reduction,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    vocab_tile: int | None,
    row_chunk: int | None,
) -> torch.Tensor:
    """The fused form of a top-k loss of the logits forms (`rows_fn`, see `_compact_loss`) on the student's head:
    checks, the counted rows of ids `[n, K]` and signal `[n, K]`, the reduction's weights, then the passes."""
    rows = _rows(student_hidden, mask, "student_hidden")
    check_topk_signals(student_hidden, ids, signal, mask, names)  # reads only [B, T] of its first argument
    student = _head(rows, student_weight, "student", bias=bias, scale=scale, softcap=softcap)
    dtype = compute_dtype(student_hidden, student_weight, signal)
    plan = _plan(student, dtype, vocab_tile, row_chunk)
    keep = mask.bool()
    weights = _reduction_weights(mask, reduction, dtype)[keep]
    return _compact_loss(student, ids[keep].long(), signal[keep].detach().to(dtype), weights, plan, rows_fn)


def fused_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: Mode = "paper",
    *,
    reduction: Reduction = "token_mean",
    divergence: Divergence = "forward_kl",
    student_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    vocab_tile: int | None = None,
    row_chunk: int | None = None,
    **params: float,
) -> torch.Tensor:
    """`topk_kd_loss` from the student's hidden states `[B, T, H]` and head `[V, H]` (only the student's head is
    projected; the teacher side is its cached or served top-k ids and log-probs `[B, T, K]`). Same modes,
    divergences, ids ≥ V rule and reductions (except `none`) as `topk_kd_loss`; no temperature (the cache holds
    the teacher at τ = 1). Optional `student_bias`, `student_logit_scale`, `student_softcap` as `fused_kd_loss`.
    """
    rows_fn = topk_rows(mode, divergence, divergence_params(divergence, params))
    return _topk_form(
        rows_fn, "teacher_ids,teacher_logprobs", student_hidden, student_weight, teacher_ids, teacher_logprobs, mask,
        reduction, student_bias, student_logit_scale, student_softcap, vocab_tile, row_chunk,
    )  # fmt: skip


def fused_adpa_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    adv_ids: torch.Tensor,
    adv_values: torch.Tensor,
    mask: torch.Tensor,
    mode: Mode = "paper",
    *,
    reduction: Reduction = "token_mean",
    student_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    vocab_tile: int | None = None,
    row_chunk: int | None = None,
) -> torch.Tensor:
    """`adpa_loss` from the student's hidden states `[B, T, H]` and head `[V, H]`: minus the expected advantage
    over the `adv_ids`/`adv_values [B, T, K]` of `adpa_advantages`, same modes and reductions (except `none`)."""
    if mode not in ("paper", "official"):
        raise ValueError(f"unknown mode {mode!r}; expected paper or official")
    return _topk_form(
        adpa_rows[mode], "adv_ids,adv_values", student_hidden, student_weight, adv_ids, adv_values, mask,
        reduction, student_bias, student_logit_scale, student_softcap, vocab_tile, row_chunk,
    )  # fmt: skip


adpa_rows = {"paper": adpa_paper_rows, "official": adpa_official_rows}


def fused_aligndistil_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    dpo_hidden: torch.Tensor,
    dpo_weight: torch.Tensor,
    other_hidden: torch.Tensor,
    other_weight: torch.Tensor,
    mask: torch.Tensor,
    beta0: float = 0.1,
    tvd_scale: float = 10.0,
    eps: float = 1e-3,
    tvd_half: bool = False,
    variant: Variant = "adaptive",
    ratio: float | None = None,
    *,
    reduction: Reduction = "sequence_mean",
    student_bias: torch.Tensor | None = None,
    dpo_bias: torch.Tensor | None = None,
    other_bias: torch.Tensor | None = None,
    vocab_tile: int | None = None,
    row_chunk: int | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`aligndistil_loss` from hidden states `[B, T, H_*]` and linear LM heads `[V, H_*]` (optional biases `[V]`)
    of the student, the DPO teacher and the other teacher (the reverse-DPO model; the SFT reference for
    `variant="theorem1"`): the same β_t·KL(π_θ ‖ π*), reductions (except `none`) and, with `return_stats`, the same
    statistics (`aligndistil_stats`), without the three models' `[B, T, V]` logits.

    π* and α come from tiles as well: the teachers' log-normalisers, then (adaptive) TVD_t = Σ_v |p_dpo − p_rev|
    and α_t, then the log-normaliser of z* = z_dpo + α_t·(z_dpo − z_rev) (theorem1: ratio·z_dpo + (1 − ratio)·z_ref);
    the reverse KL runs through the passes of `fused_kd_loss`.
    """
    if variant not in ("adaptive", "contrastive", "theorem1"):
        raise ValueError(f"unknown variant {variant!r}; expected adaptive, contrastive or theorem1")
    if variant != "adaptive" and ratio is None:
        raise ValueError(f"variant {variant!r} needs a fixed ratio β0/β, found ratio=None")
    s_rows = _rows(student_hidden, mask, "student_hidden")
    student = _head(s_rows, student_weight, "student", bias=student_bias)

    def frozen(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> Head:
        bias = None if bias is None else bias.detach()
        return _head(_rows(hidden, mask, f"{name}_hidden").detach(), weight.detach(), name, bias=bias)

    dpo = frozen(dpo_hidden, dpo_weight, dpo_bias, "dpo")
    other = frozen(other_hidden, other_weight, other_bias, "other")
    for name, head in (("dpo", dpo), ("other", other)):
        if head.weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"{name}_weight has V = {head.weight.shape[0]}, the student's {student_weight.shape[0]}")
    dtype = compute_dtype(student_hidden, student_weight, dpo_hidden, other_hidden)
    plan = _plan(student, dtype, vocab_tile, row_chunk)

    def logits(head: Head) -> Callable[[slice, int, int], torch.Tensor]:
        return lambda rows, start, end: head.logits(rows, start, end, dtype)

    if variant == "adaptive":
        lse_dpo, lse_other = _row_reduce(plan, logits(dpo), lse=True), _row_reduce(plan, logits(other), lse=True)

        def gap(rows: slice, start: int, end: int) -> torch.Tensor:
            p_dpo = (dpo.logits(rows, start, end, dtype) - lse_dpo[rows].unsqueeze(-1)).exp()
            return (p_dpo - (other.logits(rows, start, end, dtype) - lse_other[rows].unsqueeze(-1)).exp()).abs()

        alpha = tvd_scale * _row_reduce(plan, gap, lse=False) * (0.5 if tvd_half else 1.0) + eps
    else:
        alpha = plan.zeros(plan.rows).fill_(float(ratio))

    def target(rows: slice, start: int, end: int) -> torch.Tensor:
        """z* of the tile (unnormalised teacher logits)."""
        z_dpo, z_other = dpo.logits(rows, start, end, dtype), other.logits(rows, start, end, dtype)
        if variant == "theorem1":
            return ratio * z_dpo + (1 - ratio) * z_other
        return z_dpo + alpha[rows].unsqueeze(-1) * (z_dpo - z_other)

    lse_target = _row_reduce(plan, target, lse=True)
    lse_s = _row_reduce(plan, logits(student), lse=True)

    def tile_value(z_s: torch.Tensor, rows: slice, start: int, end: int) -> torch.Tensor:
        log_target = target(rows, start, end) - lse_target[rows].unsqueeze(-1)
        return kl(finite(z_s - lse_s[rows].unsqueeze(-1)), finite(log_target))

    weights = _reduction_weights(mask, reduction, dtype)[mask.bool()] * beta0 / alpha
    kl_rows = plan.zeros(plan.rows)
    loss = _divergence_passes(student, plan, weights, lse_s, tile_value, values=kl_rows)
    if not return_stats:
        return loss
    counted = torch.ones(1, plan.rows, dtype=torch.bool, device=plan.device)  # the rows are the mask's positions
    return loss, aligndistil_stats(alpha[None], kl_rows[None], counted, beta0, tvd_scale, eps, tvd_half, variant)


def _nll_rows(logits: torch.Tensor, ids: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """−ln q(label) per row from the compact row of `_compact_loss` (its log-normaliser is the full row's)."""
    picked = logits.gather(-1, ids[:, :1].clamp(max=logits.shape[-1] - 1)).squeeze(-1)
    return logits.logsumexp(-1) - picked


def fused_token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduction: Reduction = "token_mean",
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab_tile: int | None = None,
    row_chunk: int | None = None,
) -> torch.Tensor:
    """`masked_mean(−token_logps(logits, labels), mask, reduction)` (the trainers' SFT term) from hidden states
    `[B, T, H]` and a head `[V, H]`, without the `[B, T, V]` logits: the one-id case of the top-k passes (the label's
    logit and the log-sum-exp of the rest, tile by tile; the gradient spread back per tile). Labels must be < V at
    the counted positions. Optional `bias`, `logit_scale`, `softcap` as `fused_kd_loss`."""
    ids = labels.long().clamp(min=0).unsqueeze(-1)
    zeros = torch.zeros(ids.shape, dtype=hidden.dtype, device=hidden.device)
    return _topk_form(
        _nll_rows, "labels,labels", hidden, weight, ids, zeros, mask, reduction, bias, logit_scale, softcap,
        vocab_tile, row_chunk,
    )  # fmt: skip
