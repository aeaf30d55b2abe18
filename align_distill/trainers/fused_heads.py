"""The distillation trainers' fused LM-head path: the student's (and a live teacher's) final hidden states and head
weight instead of `[B, T, V]` logits, fed to `align_distill.losses.fused`.

Why here, in one place: every trainer's step does the same three things on this path: run a model's forward so that
it builds no logits (a pre-hook hands its LM head zero rows and keeps the hidden states — the same for plain causal
LMs, PEFT students and vision-language wrappers), cut the head to the tokenizer's vocabulary (a padded head's
extra rows are no tokens: `slice_logits_to_vocab` on the weight's rows), and, under ZeRO-3, hold the heads gathered
from the loss through its backward (`distributed.gathered_head`: once per step; the gradient the fused loss hands the
head needs the whole weight). `FusedLMHeadMixin.training_step` closes that gather after the backward.

`ResponseScores` is what a trainer's loss reads: the NLL, the full-vocabulary KD, the top-k KD and the ADPA term on
rows of the response view, on either path, so a trainer's `compute_loss` does not branch per term.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from align_distill.distributed import gathered_head
from align_distill.losses import (
    adpa_loss,
    fused_adpa_loss,
    fused_kd_loss,
    fused_token_nll,
    fused_topk_kd_loss,
    kd_loss,
    masked_mean,
    topk_kd_loss,
)
from align_distill.losses.reduction import token_logps

logger = logging.getLogger(__name__)

# Config attributes that change logits after the LM head (soft-capping, scales): a plain `hidden @ weightᵀ + bias`
# would miss them, so such models take the logits path.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


@dataclass
class FusedLMHeadConfig:
    """The switch every distillation trainer's config shares (a mixin: `XConfig(TRLConfig, FusedLMHeadConfig)`).

    Parameters:
        fused_lm_head (`bool`, *optional*, defaults to `True`):
            Compute the distillation loss (and the SFT term) from the student's final hidden states and LM-head
            weight, and a live teacher's, projected in vocabulary tiles (`align_distill.losses.fused`): no
            `[B, T, V]` logits. `False`: the logits path (debugging). A head that is not a plain linear layer (a
            LoRA adapter on it, logit soft-capping or scaling) takes the logits path anyway, with one info line.
    """

    fused_lm_head: bool = field(
        default=True,
        metadata={"help": "Loss from hidden states + LM head, no [B, T, V] logits (False: the logits path)."},
    )


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DeepSpeed wrappers (PEFT models answer `get_output_embeddings` themselves)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def plain_lm_head(model: torch.nn.Module) -> bool:
    """Whether logits are exactly `get_output_embeddings()(final hidden state)`: a linear head, no transforms (a
    LoRA adapter on the head is not a plain `Linear`: the logits path)."""
    model = inner_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return isinstance(head, torch.nn.Linear) and all(getattr(config, k, None) is None for k in LOGIT_TRANSFORMS)


@contextlib.contextmanager
def final_hidden(model: torch.nn.Module) -> Iterator[tuple[dict[str, torch.Tensor], torch.nn.Module]]:
    """Capture the LM head's input (the final hidden states) and give the head zero rows instead, so the model's
    forward — through whatever wrapper — builds no logits at all. Yields `(captured, head)`: `captured["hidden"]`."""
    head = inner_model(model).get_output_embeddings()
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(module, args):
        captured["hidden"] = args[0]
        return (args[0][..., :0, :], *args[1:])

    # prepend: before DeepSpeed's ZeRO-3 hooks, which would otherwise wrap the hidden states in the head's
    # backward hooks (that backward would then run for a module whose output the loss never used)
    handle = head.register_forward_pre_hook(pre_hook, prepend=True)
    try:
        yield captured, head
    finally:
        handle.remove()


@dataclass(frozen=True)
class HiddenHead:
    """A model's response-aligned final hidden states `[N, L-1, H]` and its LM head's parameters; `weight` / `bias`
    are the rows of the first `vocab_size` tokens, read when used (under ZeRO-3: after `_gather_heads`)."""

    hidden: torch.Tensor
    head_weight: torch.Tensor  # [V_head, H]
    head_bias: torch.Tensor | None
    vocab_size: int

    def rows(self, rows: slice) -> torch.Tensor:
        return self.hidden[rows]

    def _cut(self, param: torch.Tensor) -> torch.Tensor:
        return param if param.shape[0] == self.vocab_size else param[: self.vocab_size]

    @property
    def weight(self) -> torch.Tensor:
        return self._cut(self.head_weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.head_bias is None else self._cut(self.head_bias)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.head_weight, self.head_bias) if p is not None]


def hidden_and_head(model: torch.nn.Module, forward: dict[str, Any], vocab_size: int) -> HiddenHead:
    """Run `model(**forward)` without logits; the hidden states aligned as `response_view` aligns logits (position
    t predicts token t + 1) and the head, cut to `vocab_size` tokens when read."""
    with final_hidden(model) as (captured, head):
        model(**forward, use_cache=False)
    return HiddenHead(captured["hidden"][:, :-1], head.weight, head.bias, vocab_size)


@torch.no_grad()
def head_argmax(view: HiddenHead, mask: torch.Tensor, like: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """The head's argmax token at the counted positions of `mask` (-1 elsewhere), `rows` positions at a time (a
    `[rows, V]` tile, never `[B, T, V]`): the token accuracy a trainer logs on the fused path."""
    out = torch.full_like(like, -1)
    hidden = view.hidden[mask]
    picked = []
    for start in range(0, hidden.shape[0], rows):
        logits = hidden[start : start + rows] @ view.weight.T
        picked.append((logits if view.bias is None else logits + view.bias).argmax(-1))
    if picked:
        out[mask] = torch.cat(picked).to(out.dtype)
    return out


@dataclass
class ResponseScores:
    """The student's side of a distillation loss over the response view (`labels`, `mask` `[N, L-1]`), on the
    logits path (`logits [N, L-1, V]`) or the fused one (`student`: hidden states + head). Each method takes
    `rows` (a slice of the batch) and returns the reduced term."""

    labels: torch.Tensor
    mask: torch.Tensor
    reduction: str
    chunk_size: int | None = None
    logits: torch.Tensor | None = None
    student: HiddenHead | None = None

    def nll(self, rows: slice) -> torch.Tensor:
        """NLL of the response tokens (the SFT term); fused: `fused_token_nll`, no logits."""
        labels, mask = self.labels[rows], self.mask[rows]
        if self.student is None:
            return masked_mean(-token_logps(self.logits[rows], labels), mask, self.reduction)
        s = self.student
        return fused_token_nll(s.rows(rows), s.weight, labels, mask, reduction=self.reduction, bias=s.bias)

    def kd(self, rows: slice, teacher: torch.Tensor | HiddenHead, **params: Any) -> torch.Tensor:
        """`kd_loss` against a live teacher: its aligned logits (logits path) or hidden states + head (fused)."""
        mask = self.mask[rows]
        if self.student is None:
            return kd_loss(
                self.logits[rows], teacher[rows], mask, chunk_size=self.chunk_size, reduction=self.reduction, **params
            )
        s = self.student
        return fused_kd_loss(
            s.rows(rows), s.weight, teacher.rows(rows), teacher.weight, mask,
            reduction=self.reduction, student_bias=s.bias, teacher_bias=teacher.bias, **params,
        )  # fmt: skip

    def topk_kd(self, rows: slice, ids: torch.Tensor, logprobs: torch.Tensor, **params: Any) -> torch.Tensor:
        """`topk_kd_loss` against top-k signals (cache, server, or a live teacher's top-k)."""
        mask = self.mask[rows]
        if self.student is None:
            return topk_kd_loss(
                self.logits[rows], ids, logprobs, mask, chunk_size=self.chunk_size, reduction=self.reduction, **params
            )
        s = self.student
        return fused_topk_kd_loss(
            s.rows(rows), s.weight, ids, logprobs, mask, reduction=self.reduction, student_bias=s.bias, **params
        )

    def adpa(self, rows: slice, ids: torch.Tensor, values: torch.Tensor, mode: str) -> torch.Tensor:
        """`adpa_loss` over the advantages at `ids`."""
        mask = self.mask[rows]
        if self.student is None:
            return adpa_loss(
                self.logits[rows], ids, values, mask, mode=mode, chunk_size=self.chunk_size, reduction=self.reduction
            )
        s = self.student
        return fused_adpa_loss(
            s.rows(rows), s.weight, ids, values, mask, mode, reduction=self.reduction, student_bias=s.bias
        )

    @property
    def device(self) -> torch.device:
        return self.labels.device


class FusedLMHeadMixin:
    """Mixed into a distillation trainer (before the TRL class): `_fused_ready` decides the path per batch,
    `_gather_heads` gathers ZeRO-3 heads once per step, held until `training_step` / `prediction_step` end (the
    backward runs inside)."""

    _fused_stack: contextlib.ExitStack | None = None
    _fused_held: set[int] = frozenset()  # type: ignore[assignment]
    _fused_logged: bool = False

    def _fused_ready(self, *models: Any) -> bool:
        """Whether this step takes the fused path: `args.fused_lm_head` and a plain linear head on every model that
        is run here (others: the logits path, with one info line)."""
        if not getattr(self.args, "fused_lm_head", False):
            return False
        plain = all(plain_lm_head(m) for m in models if m is not None)
        if not plain and not self._fused_logged:
            self._fused_logged = True
            logger.info(
                "%s: a model's LM head is not a plain linear layer (a LoRA adapter on the head, logit soft-capping "
                "or scaling): the distillation loss takes the logits path (fused_lm_head needs hidden @ weightᵀ)",
                type(self).__name__,
            )
        return plain

    def _fused_hidden(self, model: torch.nn.Module, forward: dict[str, Any], vocab_size: int) -> HiddenHead:
        """`hidden_and_head` on `model`, its head then gathered (ZeRO-3) until the step's backward is done."""
        view = hidden_and_head(model, forward, vocab_size)
        self._gather_heads(view)
        return view

    def _gather_heads(self, *heads: HiddenHead) -> None:
        """Under ZeRO-3, gather these heads whole now, until `training_step` / `prediction_step` end (collective:
        every rank takes the same path; a tied head is gathered once). Without DeepSpeed nothing happens."""
        if self._fused_stack is None:
            return
        fresh = {id(p): p for h in heads for p in h.params if hasattr(p, "ds_id") and id(p) not in self._fused_held}
        if fresh:
            self._fused_stack.enter_context(gathered_head(*fresh.values()))
            self._fused_held |= set(fresh)

    @contextlib.contextmanager
    def _fused_step(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self._fused_stack, self._fused_held = stack, set()
            try:
                yield
            finally:
                self._fused_stack, self._fused_held = None, set()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._fused_step():  # the loss and its backward
            return super().training_step(*args, **kwargs)

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._fused_step():
            return super().prediction_step(*args, **kwargs)
