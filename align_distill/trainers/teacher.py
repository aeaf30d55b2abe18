"""What the teacher-signal methods (DCKD, ADPA) share: the config of the teacher side (`TeacherPairConfig`), the
collator that adds cached teacher signals to TRL's preference batch, loading a frozen teacher, and
`TeacherPairTrainer` (TRL's `DPOTrainer` without a DPO reference: the teachers replace it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from trl import DPOConfig, DPOTrainer

from align_distill.losses import masked_mean
from align_distill.losses.reduction import token_logps
from align_distill.models import check_tokenizer_compatibility, load_model, load_tokenizer, slice_logits_to_vocab
from align_distill.models.vocab import check_model_vocab
from align_distill.vocabulary import reject_ignored_fields

from .common import (
    DPO_LOSS_OPTIONS,
    DPO_REFERENCE_SYNC,
    default_precision,
    frozen_logits,
    prepare_frozen,
    record_metrics,
    response_view,
)
from .signals import TeacherSignalReader


@dataclass
class TeacherPairConfig(DPOConfig):
    r"""What DCKD and ADPA configs share: TRL's `DPOConfig` (data, optimisation, logging, saving) plus the teacher and
    the loss mode. DPO fields the distillation loss never reads (`loss_type`, the reference-model options, ...:
    `ignored_fields`) are rejected when set.

    Parameters:
        > Parameters that control the teacher

        teacher_mode (`str`, *optional*, defaults to `"cache"`):
            `cache`: read the teachers' top-k signals from `signals_path` (no teacher in memory). `live`: load the
            teacher model(s) and run them on every batch (no grad).
        signals_path (`str`, *optional*):
            Teacher-signal cache (`align-distill generate signals`) computed on exactly the responses trained on.
        teacher_name (`str`, *optional*, defaults to `"dpo"`):
            Name of the aligned (DPO) teacher's signals in the cache.
        teacher_model_name_or_path (`str`, *optional*):
            The aligned (DPO) teacher, for `teacher_mode="live"`. Must share the student's tokenizer.
        teacher_dtype (`str`, *optional*, defaults to `"auto"`):
            dtype live teachers are loaded in.
        signals_top_k (`int`, *optional*, defaults to `50`):
            Live teachers: ids kept per position where the loss is top-k (cache mode uses the cache's k).

        > Parameters that control the loss

        loss_mode (`str`, *optional*, defaults to `"paper"`):
            `paper`: the paper's formulas without clamps. `official`: the official code's clamps
            (dckd_adpa §3.2, §4.3).
        sft_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the NLL on the dataset's chosen response.
        loss_reduction (`str`, *optional*, defaults to `"token_mean"`):
            `token_mean` (pooled over the micro-batch, as the official code) or `sequence_mean`.
        loss_chunk_size (`int`, *optional*):
            Positions per chunk of the vocabulary-wide loss work (bounds peak memory); `None` picks ~16 MiB chunks.

    Changed defaults: `bf16=None` means bf16 only on a CUDA device that supports it; `learning_rate` 5e-7 (the
    official DCKD/ADPA recipes).

    Deprecated key (one release): `top_k` → `signals_top_k`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {"top_k": "signals_top_k"}
    ignored_fields: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("loss_type", *DPO_LOSS_OPTIONS), "the DPO loss is replaced by the distillation loss"),
        "label_smoothing_factor": "the distillation loss replaces the Trainer's",
        "router_aux_loss_coef": "the distillation loss has no MoE load-balancing term",
        **dict.fromkeys(
            ("precompute_ref_log_probs", "precompute_ref_batch_size", *DPO_REFERENCE_SYNC),
            "there is no DPO reference model; the teachers replace it",
        ),
    }
    method_label: ClassVar[str] = "DCKD/ADPA"

    teacher_mode: Literal["cache", "live"] = field(
        default="cache", metadata={"help": "cache: read teacher signals from signals_path; live: run the teacher(s)."}
    )
    signals_path: str | None = field(
        default=None, metadata={"help": "Teacher-signal cache computed on the responses trained on (cache mode)."}
    )
    teacher_name: str = field(default="dpo", metadata={"help": "Name of the aligned teacher's signals in the cache."})
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The aligned (DPO) teacher model (teacher_mode=live)."}
    )
    teacher_dtype: str = field(default="auto", metadata={"help": "dtype of live teachers."})
    signals_top_k: int = field(default=50, metadata={"help": "Live teachers: ids per position of top-k losses."})
    loss_mode: Literal["paper", "official"] = field(
        default="paper", metadata={"help": "paper: the paper's formulas, no clamps; official: the official clamps."}
    )
    sft_weight: float = field(default=1.0, metadata={"help": "Weight of the NLL on the chosen response."})
    loss_reduction: Literal["token_mean", "sequence_mean"] = field(
        default="token_mean", metadata={"help": "token_mean (pooled over the micro-batch) or sequence_mean."}
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk of the vocabulary-wide loss work (None: automatic)."}
    )
    learning_rate: float = field(default=5e-7, metadata={"help": "Initial AdamW learning rate."})

    live_fields = ("teacher_model_name_or_path",)

    def __post_init__(self) -> None:
        default_precision(self)
        reject_ignored_fields(self)  # the values as given, before TRL resolves them
        super().__post_init__()
        check_teacher_mode(self, live_fields=self.live_fields)


def check_teacher_mode(config: Any, live_fields: tuple[str, ...]) -> None:
    """`cache` needs `signals_path`; `live` needs the teacher model fields."""
    name = type(config).__name__
    if config.teacher_mode not in ("cache", "live"):
        raise ValueError(f"{name}: teacher_mode must be cache or live, found {config.teacher_mode!r}")
    if config.loss_mode not in ("paper", "official"):
        raise ValueError(f"{name}: loss_mode must be paper or official, found {config.loss_mode!r}")
    if config.teacher_mode == "cache" and not config.signals_path:
        raise ValueError(f"{name}: teacher_mode=cache needs signals_path (the output of `generate signals`)")
    if config.teacher_mode == "live":
        missing = [f for f in live_fields if not getattr(config, f)]
        if missing:
            raise ValueError(f"{name}: teacher_mode=live needs {', '.join(missing)}")
    if config.signals_top_k < 1:
        raise ValueError(f"{name}: signals_top_k must be >= 1, found {config.signals_top_k}")


@dataclass
class SignalsCollator:
    """TRL's preference collator plus cached teacher signals: `{prefix}ids` / `{prefix}logprobs` /
    `{prefix}token_logprobs` (`[N, L-1, K]`, `[N, L-1]`) for the batch rows that `layout` names."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    reader: TeacherSignalReader
    layout: Callable[[list[dict[str, Any]]], list[tuple[str, str]]]
    rows: Callable[[int], slice]
    prefixes: dict[str, str]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        rows = self.rows(len(examples))
        signals = self.reader.collate(
            self.layout(examples), batch["input_ids"][rows], batch["completion_mask"][rows], list(self.prefixes)
        )
        for teacher, prefix in self.prefixes.items():
            batch[f"{prefix}ids"] = signals[teacher].ids
            batch[f"{prefix}logprobs"] = signals[teacher].logprobs
            batch[f"{prefix}token_logprobs"] = signals[teacher].token_logprobs
        return batch


def load_teacher(model: Any, tokenizer: Any, dtype: str, name: str, trust_remote_code: bool = False) -> Any:
    """A frozen teacher from a path (its tokenizer must match the student's) or an already loaded model."""
    if isinstance(model, str):
        check_tokenizer_compatibility(
            load_tokenizer(model, trust_remote_code=trust_remote_code), tokenizer, names=(name, "student")
        )
        model = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, frozen=True)
    check_model_vocab(model, tokenizer, name=name)
    return model


class TeacherPairTrainer(DPOTrainer):
    """What DCKD and ADPA share on top of TRL's `DPOTrainer`: no DPO reference model (the teachers replace it), the
    row `id` kept for the signal cache, live teachers frozen and placed like TRL's reference model, student logits
    aligned to the responses over the shared vocabulary, and `_record` for TRL-style metrics."""

    _tag_names = ["trl", "align-distill"]
    # extra dataset columns the collator needs (TRL drops columns the model's forward does not take)
    extra_columns: tuple[str, ...] = ("id",)

    def __init__(self, model: Any, args: Any, train_dataset: Any, processing_class: Any, **kwargs: Any):
        # DPOTrainer builds a reference model unless reference log-probs are precomputed; distillation has no DPO
        # reference term, so take that path and make the precomputation a no-op (`_precompute_ref_logps`).
        requested = args.precompute_ref_log_probs
        args.precompute_ref_log_probs = True
        try:
            super().__init__(
                model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, **kwargs
            )
        finally:
            args.precompute_ref_log_probs = requested
        self.precompute_ref_logps = False
        self.vocab_size = len(self._tokenizer)

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self.extra_columns]))

    def _frozen(self, model: Any) -> Any:
        return prepare_frozen(model, self.accelerator, self.is_deepspeed_enabled)

    def _aligned(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """`(logits [N, L-1, V], labels, mask)` over the tokenizer's vocabulary (a padded head is cut)."""
        return response_view(
            slice_logits_to_vocab(logits, self.vocab_size), inputs["input_ids"], inputs["completion_mask"]
        )

    def _teacher_logits(self, teacher: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = frozen_logits(teacher, inputs["input_ids"], inputs["attention_mask"])
        return self._aligned(logits, inputs)[0]

    def _student_outputs(self, model: Any, inputs: dict[str, torch.Tensor]) -> Any:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)

    def _sft(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(-token_logps(logits, labels), mask, self.args.loss_reduction)

    def _record(self, values: dict[str, torch.Tensor]) -> None:
        record_metrics(self, values)
