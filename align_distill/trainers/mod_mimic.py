"""LLaVA-MoD stage 1, mimic distillation (docs/methods/llava_mod.md §4): `MoDMimicConfig`, `MoDMimicTrainer`.

Two steps, one trainer (`stage`):

- `d2d` (dense → dense): L = KL(teacher ‖ student) on response tokens; the whole language model and the projector
  train, a vision tower stays frozen (`set_d2d_trainable`).
- `d2s` (dense → sparse, after `align_distill.models.moe.upcycle_to_moe`): L = KL + CE + 0.01 · Σ_layers ℓ_aux,
  with only FFNs / experts / routers and the projector trainable (`set_d2s_trainable`).

The teacher is a live frozen model (`kd_loss`, full vocabulary, τ = 1) or, without one, the teacher-signal cache
of the `signals` job (`topk_kd_loss`, top-k + rest bucket). Text and vision-language (LLaVA) models alike: the
batch is TRL's SFT prompt/completion batch, and the teacher sees exactly the student's inputs (pixel values too).

Token alignment: the textbook one (`trainers.common.response_view`), logits at t against the response token t+1;
the official code's unshifted mask (llava_mod §4.2) is a quirk we do not reproduce. The balancing loss follows
docs/methods/llava_mod.md
(DeepSpeed's first-choice ℓ_aux per MoE layer, summed) over non-padding tokens; the official code also counts
padding. It is added once (the official D2S adds it twice, docs/methods/llava_mod.md §3.3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

from align_distill.losses import kd_loss, masked_mean, moe_balancing_loss, topk_kd_loss
from align_distill.losses.divergence import chunked_token_map
from align_distill.models.moe import PROJECTOR_NAMES, parameter_numel, set_d2s_trainable
from align_distill.models.vocab import slice_logits_to_vocab
from align_distill.teachers.signals import scatter_rows
from align_distill.teachers.sources import SignalsRequest
from align_distill.trainers.common import default_precision
from align_distill.vocabulary import reject_ignored_fields

from .common import prepare_frozen, response_view
from .fused_heads import FusedLMHeadConfig, FusedLMHeadMixin, ResponseScores, head_argmax

logger = logging.getLogger(__name__)

VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual")


@dataclass
class MoDMimicConfig(SFTConfig, FusedLMHeadConfig):
    r"""
    Configuration for [`MoDMimicTrainer`]: TRL's `SFTConfig` plus the mimic-distillation knobs.

    > Parameters that control the stage

    stage (`str`, defaults to `"d2d"`):
        `d2d`: KD only, whole LM + projector trained. `d2s`: KD + CE + MoE balancing loss, only FFN / experts /
        routers + projector trained (the model should be an upcycled MoE).

    > Parameters that control the loss

    kd_weight (`float`, defaults to `1.0`):
        Weight of the mimic loss KL(teacher ‖ student) (token mean over response tokens, τ = 1).
    sft_weight (`float`, *optional*):
        Weight of the next-token cross-entropy on the response. `None`: 0 for `d2d`, 1 for `d2s` (llava_mod §4.1).
    aux_loss_weight (`float`, defaults to `0.01`):
        Weight of the load-balancing loss Σ_layers ℓ_aux (docs/methods/llava_mod.md §3.2); only an MoE student has one.
    balancing_convention (`str`, defaults to `"deepspeed"`):
        `deepspeed` (the method page's ℓ_aux, first choices, per layer) or `transformers` (the model's own aux loss).
    loss_chunk_size (`int`, *optional*):
        Positions per chunk of the full-vocabulary KL, logits path (`None`: about 16 MiB per float32 intermediate).
    fused_lm_head (`bool`, defaults to `True`):
        KL, CE and token accuracy from hidden states and LM heads in vocabulary tiles, no `[B, T, V]` logits;
        `False`: the logits path (`FusedLMHeadConfig`).
    loss_mode (`str`, defaults to `"paper"`):
        With a teacher-signal cache: `paper` (exact top-k + rest KL) or `official` (DCKD's clamps).
    teacher_name (`str`, *optional*):
        Which teacher of the signal cache to mimic; `None` = its first teacher.

    Changed defaults from `SFTConfig`: `bf16=None` (bf16 only on a CUDA device that supports it), learning_rate 2e-5
    (spec, both mimic steps), `completion_only_loss=True`, `remove_unused_columns=False`. SFT fields the mimic loss
    never reads (`loss_type`, `router_aux_loss_coef` — use `aux_loss_weight` —, `label_smoothing_factor`) are
    rejected when set.

    Deprecated keys (one release): `kd_coef` → `kd_weight`, `ce_coef` → `sft_weight`, `aux_loss_coef` →
    `aux_loss_weight`, `kd_chunk_size` → `loss_chunk_size`, `topk_mode` → `loss_mode`, `signals_teacher` →
    `teacher_name`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {
        "kd_coef": "kd_weight",
        "ce_coef": "sft_weight",
        "aux_loss_coef": "aux_loss_weight",
        "kd_chunk_size": "loss_chunk_size",
        "topk_mode": "loss_mode",
        "signals_teacher": "teacher_name",
    }
    ignored_fields: ClassVar[dict[str, str]] = {
        "loss_type": "the SFT loss is replaced by the mimic loss",
        "label_smoothing_factor": "the SFT loss is replaced by the mimic loss",
        "router_aux_loss_coef": "the balancing loss is weighted by `aux_loss_weight`",
    }
    method_label: ClassVar[str] = "LLaVA-MoD mimic (d2d/d2s)"

    stage: str = field(
        default="d2d", metadata={"help": "d2d (dense→dense) or d2s (dense→sparse).", "choices": ["d2d", "d2s"]}
    )
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of KL(teacher ‖ student)."})
    sft_weight: float | None = field(default=None, metadata={"help": "Weight of the response CE; None: 0 d2d, 1 d2s."})
    aux_loss_weight: float = field(default=0.01, metadata={"help": "Weight of the MoE load-balancing loss."})
    balancing_convention: str = field(
        default="deepspeed",
        metadata={
            "help": "Balancing loss: deepspeed (docs/methods/llava_mod.md) or transformers.",
            "choices": ["deepspeed", "transformers"],
        },
    )
    loss_chunk_size: int | None = field(default=None, metadata={"help": "Positions per chunk of the full-vocab KL."})
    loss_mode: str = field(
        default="paper",
        metadata={"help": "Top-k KL from the cache: paper or official.", "choices": ["paper", "official"]},
    )
    teacher_name: str | None = field(default=None, metadata={"help": "Teacher name in the signal cache."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial learning rate (method doc: 2e-5)."})
    completion_only_loss: bool | None = field(default=True, metadata={"help": "Loss on the completion only."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 (None: only on a CUDA device that supports it)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the `id` column (the signal cache is keyed by it)."}
    )

    def __post_init__(self) -> None:

        default_precision(self)
        if self.stage not in ("d2d", "d2s"):
            raise ValueError(f"MoDMimicConfig.stage must be 'd2d' or 'd2s', got {self.stage!r}")
        if self.sft_weight is None:
            self.sft_weight = 1.0 if self.stage == "d2s" else 0.0
        reject_ignored_fields(self)  # the values as given, before TRL resolves them
        super().__post_init__()


# ---------------------------------------------------------------- parameter selection


def _is_vision_tower(name: str) -> bool:
    return any(part in VISION_TOWER_NAMES for part in name.split("."))


def set_d2d_trainable(model: nn.Module) -> list[str]:
    """D2D trainable set (llava_mod §1): every parameter except a vision tower's; returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(not _is_vision_tower(name))
        if p.requires_grad:
            names.append(name)
    return names


def set_stage_trainable(model: nn.Module, stage: str) -> list[str]:
    """Apply the method page's trainable set of `stage` (`d2d`, or `d2s` / `pd`) to `model` and return the names."""
    names = set_d2d_trainable(model) if stage == "d2d" else set_d2s_trainable(model)
    total = sum(parameter_numel(p) for p in model.parameters())
    trainable = sum(parameter_numel(p) for p in model.parameters() if p.requires_grad)
    logger.info("%s: %d of %d parameters trainable (%.1f%%)", stage, trainable, total, 100 * trainable / total)
    return names


def has_projector(model: nn.Module) -> bool:
    return any(name.rsplit(".", 1)[-1] in PROJECTOR_NAMES for name, _ in model.named_modules())


# ---------------------------------------------------------------- router logits


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The top-k routers of a transformers MoE model (modules with `num_experts` and `top_k`, named `*.gate`)."""
    return [
        m
        for name, m in model.named_modules()
        if name.endswith(".gate") and hasattr(m, "num_experts") and hasattr(m, "top_k")
    ]


class RouterLogits:
    """Records each router's logits `[S, E]` during a forward inside `with recorder:` (forward hooks).

    Hooks instead of `output_router_logits`: vision-language wrappers do not return router logits, and TRL's fused
    LM head drops them. Outside the `with`, nothing is kept (so gradient-checkpointing recomputes add nothing).
    """

    def __init__(self, model: nn.Module):
        self.routers = moe_routers(model)
        self.num_experts = self.routers[0].num_experts if self.routers else 0
        self.top_k = self.routers[0].top_k if self.routers else 0
        self.logits: list[torch.Tensor] = []
        self._active = False
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active:
            self.logits.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self) -> RouterLogits:
        self.logits = []
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def balancing_loss(
    router_logits: list[torch.Tensor],
    attention_mask: torch.Tensor | None,
    top_k: int,
    num_experts: int,
    convention: str,
) -> torch.Tensor:
    """Σ_layers ℓ_aux over the tokens of `attention_mask` (router logits `[B·T, E]` per layer)."""
    return moe_balancing_loss(
        router_logits, top_k=top_k, num_experts=num_experts, attention_mask=attention_mask, convention=convention
    )


def response_nll(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-token next-token NLL `[B, T]` (0 off the mask), chunked like the KL so no float32 `[B, T, V]` copy is
    made (the D2S cross-entropy at a 151k vocabulary)."""

    def nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return rows.logsumexp(-1) - rows.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)

    return chunked_token_map(nll, logits, labels, mask=mask, chunk_size=chunk_size)


# ---------------------------------------------------------------- trainer


class MoDMimicTrainer(FusedLMHeadMixin, SFTTrainer):
    """TRL's SFTTrainer with LLaVA-MoD's mimic loss (see the module docstring).

    Args beyond `SFTTrainer`'s:
        teacher_model: the frozen dense teacher (same tokenizer / processor as the student); or
        teacher_signals: a `SignalsCache` (`align_distill.data_gen.load_signals`) over the same rows (`id` column),
            used when no teacher model is given; or
        teacher_source: a top-k teacher source (`align_distill.teachers`, e.g. a `ServerTeacher`), text only.
        With a cache or a source the mimic loss is the top-k form (`topk_kd_loss`).
    """

    _tag_names = ["trl", "sft", "align-distill", "llava-mod"]
    loss_is_scaled_for_ga = False  # a per-micro-batch token mean: Trainer divides by the accumulation steps

    def __init__(
        self,
        model: nn.Module,
        teacher_model: nn.Module | None = None,
        args: MoDMimicConfig | None = None,
        teacher_signals: Any = None,
        teacher_source: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            raise ValueError("MoDMimicTrainer needs an MoDMimicConfig (args)")
        if teacher_model is None and teacher_signals is None and teacher_source is None:
            raise ValueError("MoDMimicTrainer needs a teacher_model, a teacher_signals cache or a teacher_source")
        if isinstance(model, str):
            raise TypeError("MoDMimicTrainer expects a loaded model (the trainable set is applied before training)")
        self.trainable_names = set_stage_trainable(model, args.stage)
        self.router_logits = RouterLogits(model)
        if args.stage == "d2s" and not self.router_logits.routers:
            logger.warning("stage d2s with a dense student: no MoE routers, so no balancing loss (upcycle first?)")
        # SFTTrainer would switch on the model's own aux loss (`output_router_logits` in its config): ours is added in
        # compute_loss, so keep the model's off (also for generation after training) and record the coefficient
        args.router_aux_loss_coef = 0.0
        super().__init__(model=model, args=args, **kwargs)
        text_config = model.config.get_text_config()
        if hasattr(text_config, "router_aux_loss_coef"):
            text_config.output_router_logits = False
            text_config.router_aux_loss_coef = args.aux_loss_weight
        self._shared_vocab = len(self._tokenizer)
        self.teacher_signals = teacher_signals
        self.teacher_source = teacher_source
        self.teacher_model = None
        if teacher_model is not None:
            self.teacher_model = prepare_frozen(teacher_model, self.accelerator, self.is_deepspeed_enabled)
        elif teacher_source is not None:
            return
        elif args.teacher_name is None:
            args.teacher_name = teacher_signals.teachers[0]["name"]
        if teacher_signals is not None and self.teacher_model is None:
            self.data_collator = _WithRowIds(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "id" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "id"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args: MoDMimicConfig = self.args
        row_ids = inputs.pop("row_ids", None)
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "id")}
        model_inputs["use_cache"] = False
        if not return_outputs and self._fused_ready(model, self.teacher_model):
            return self._fused_loss(model, inputs, model_inputs, row_ids)
        with self.router_logits as router:
            outputs = model(**model_inputs)
        logits, targets, mask = response_view(outputs.logits, inputs["input_ids"], labels != -100)
        logits = slice_logits_to_vocab(logits, self._shared_vocab)

        if self.teacher_model is not None:
            with torch.no_grad():
                teacher_logits = self.teacher_model(**model_inputs).logits[:, :-1]
            teacher_logits = slice_logits_to_vocab(teacher_logits, self._shared_vocab)
            kd = kd_loss(logits, teacher_logits, mask, divergence="forward_kl", chunk_size=args.loss_chunk_size)
        else:
            if self.teacher_source is not None:
                ids, logprobs = self._source_topk(inputs, labels)
            else:
                ids, logprobs = self._cached_topk(row_ids, mask)
            kd = topk_kd_loss(logits, ids, logprobs, mask, mode=args.loss_mode, chunk_size=args.loss_chunk_size)
        loss = args.kd_weight * kd
        metrics = {"kd_loss": kd.detach()}

        if args.sft_weight:
            ce = masked_mean(response_nll(logits, targets, mask, args.loss_chunk_size), mask)
            loss = loss + args.sft_weight * ce
            metrics["ce_loss"] = ce.detach()
        with torch.no_grad():
            predicted = logits.argmax(-1)
        loss = self._finish(loss, metrics, router, inputs, predicted, targets, mask, mode)
        return (loss, outputs) if return_outputs else loss

    def _fused_loss(self, model, inputs, model_inputs, row_ids) -> torch.Tensor:
        """`compute_loss` on the fused path: hidden states + LM heads (`fused_lm_head`), no `[B, T, V]` logits."""
        args: MoDMimicConfig = self.args
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        forward = {k: v for k, v in model_inputs.items() if k != "use_cache"}
        with self.router_logits as router:
            student = self._fused_hidden(model, forward, self._shared_vocab)
        targets, mask = inputs["input_ids"][:, 1:], (labels != -100)[:, 1:]
        scores = ResponseScores(targets, mask, "token_mean", student=student)
        if self.teacher_model is not None:
            with torch.no_grad():
                teacher = self._fused_hidden(self.teacher_model, forward, self._shared_vocab)
            kd = scores.kd(slice(None), teacher, divergence="forward_kl")
        else:
            if self.teacher_source is not None:
                ids, logprobs = self._source_topk(inputs, labels)
            else:
                ids, logprobs = self._cached_topk(row_ids, mask)
            kd = scores.topk_kd(slice(None), ids, logprobs, mode=args.loss_mode)
        loss = args.kd_weight * kd
        metrics = {"kd_loss": kd.detach()}
        if args.sft_weight:
            ce = scores.nll(slice(None))
            loss = loss + args.sft_weight * ce
            metrics["ce_loss"] = ce.detach()
        predicted = head_argmax(student, mask, targets)
        return self._finish(loss, metrics, router, inputs, predicted, targets, mask, mode)

    def _finish(self, loss, metrics, router, inputs, predicted, targets, mask, mode) -> torch.Tensor:
        """The balancing loss added, metrics logged (losses, token accuracy from `predicted`, tokens seen)."""
        args: MoDMimicConfig = self.args
        if router.logits and args.aux_loss_weight:
            aux = balancing_loss(
                router.logits,
                inputs.get("attention_mask"),
                self.router_logits.top_k,
                self.router_logits.num_experts,
                args.balancing_convention,
            )
            loss = loss + args.aux_loss_weight * aux
            metrics["aux_loss"] = aux.detach()

        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())
        with torch.no_grad():
            n = mask.sum()
            correct = ((predicted == targets) & mask).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / n.clamp(min=1)).item())
        if mode == "train":
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _source_topk(self, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher source's top-k ids / log-probs `[B, T-1, K]` on the batch's response tokens."""
        input_ids = inputs["input_ids"]
        keys = [("", "completion")] * input_ids.shape[0]
        attention = inputs.get("attention_mask")
        request = SignalsRequest(keys, input_ids.cpu(), (labels != -100).long().cpu(), attention)
        signals = self.teacher_source.signals(request)
        return signals.ids.to(input_ids.device), signals.logprobs.to(input_ids.device)

    def _cached_topk(self, row_ids: list[str] | None, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter the cache's top-k ids / log-probs of each row's completion onto the aligned `[B, T-1, K]` grid."""
        if row_ids is None:
            raise ValueError("the teacher-signal cache needs an `id` column in the training data")
        teacher = self.args.teacher_name
        rows = [self.teacher_signals[row_id].responses["completion"].teachers[teacher] for row_id in row_ids]
        ids = scatter_rows(mask, [r.topk_ids for r in rows], fill=0)
        logprobs = scatter_rows(mask, [r.topk_logprobs for r in rows], fill=0.0)
        return ids.long(), logprobs


class _WithRowIds:
    """Wrap a collator so that the batch carries the rows' ids (`row_ids`, a list of str)."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        row_ids = [example["id"] for example in examples]
        batch = self.collator([{k: v for k, v in example.items() if k != "id"} for example in examples])
        batch["row_ids"] = row_ids
        return batch


__all__ = [
    "MoDMimicConfig",
    "MoDMimicTrainer",
    "RouterLogits",
    "balancing_loss",
    "has_projector",
    "moe_routers",
    "set_d2d_trainable",
    "set_stage_trainable",
]
