"""DCKD: dual-constrained knowledge distillation from an aligned (DPO) teacher (specs/dckd_adpa.md §3).

    L = sft_weight · NLL(chosen) + chosen_kl_weight · KL_chosen + rejected_kl_weight · KL_rejected

with KL = KL(π_dpo ‖ π_θ) on the dataset's chosen and rejected responses (prompt masked). `DCKDTrainer` is TRL's
`DPOTrainer` (tokenization, collation — `input_ids [2B, L]` chosen then rejected —, logging, saving) with the DPO
loss replaced: the trainer only lines up the student's logits with the teacher signals and calls
`align_distill.losses`. The teacher comes from the signal cache of `align-distill generate signals`
(`teacher_mode="cache"`, top-k + rest bucket, `topk_kd_loss`) or runs next to the student (`teacher_mode="live"`,
full vocabulary, `kd_loss`).

`TeacherPairTrainer` is the part DCKD and ADPA share: no DPO reference model, frozen live teachers, signals in
the batch, and metrics logged the way TRL logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from trl import DPOConfig, DPOTrainer

from align_distill.losses import kd_loss, masked_mean, topk_kd_loss
from align_distill.losses.reduction import token_logps
from align_distill.methods.common import default_precision
from align_distill.models import check_tokenizer_compatibility, load_model, load_tokenizer, slice_logits_to_vocab
from align_distill.models.vocab import check_model_vocab

from .common import frozen_logits, prepare_frozen, response_view
from .signals import TeacherSignalReader, live_signals


@dataclass
class TeacherPairConfig(DPOConfig):
    r"""What DCKD and ADPA configs share: TRL's `DPOConfig` (data, optimisation, logging, saving) plus the teacher and
    the loss mode. DPO-only fields (`loss_type`, reference-model options) are unused.

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
        top_k (`int`, *optional*, defaults to `50`):
            Live teachers: ids kept per position where the loss is top-k (cache mode uses the cache's k).

        > Parameters that control the loss

        loss_mode (`str`, *optional*, defaults to `"paper"`):
            `paper`: the paper's formulas without clamps. `official`: the official code's clamps (spec §3.2, §4.3).
        sft_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the NLL on the dataset's chosen response.
        loss_reduction (`str`, *optional*, defaults to `"token_mean"`):
            `token_mean` (pooled over the micro-batch, as the official code) or `sequence_mean`.
        loss_chunk_size (`int`, *optional*):
            Positions per chunk of the vocabulary-wide loss work (bounds peak memory); `None` picks ~16 MiB chunks.

    Changed defaults: `bf16=None` means bf16 only on a CUDA device that supports it; `learning_rate` 5e-7 (the
    official DCKD/ADPA recipes).
    """

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
    top_k: int = field(default=50, metadata={"help": "Live teachers: ids per position of top-k losses."})
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
        super().__post_init__()
        check_teacher_mode(self, live_fields=self.live_fields)


@dataclass
class DCKDConfig(TeacherPairConfig):
    r"""Configuration of [`DCKDTrainer`]: `TeacherPairConfig` (TRL's `DPOConfig` + the teacher, see there) plus
    the KL weights. L = sft_weight · NLL(chosen) + chosen_kl_weight · KL_chosen + rejected_kl_weight · KL_rejected.

    Parameters:
        > Parameters that control the loss

        chosen_kl_weight (`float`, *optional*, defaults to `0.1`):
            Weight of KL(teacher ‖ student) on the chosen response (official recipe: 1 · 0.1).
        rejected_kl_weight (`float`, *optional*, defaults to `0.1`):
            Weight of KL(teacher ‖ student) on the rejected response (official recipe: 1 · 0.1).

    In `paper` mode the KL is unclamped: top-k + rest bucket from the cache, the full vocabulary with a live teacher.
    `official` mode is the (K+1)-bin KL with the official clamps (live: over the teacher's `top_k` ids).
    """

    chosen_kl_weight: float = field(default=0.1, metadata={"help": "Weight of KL(teacher‖student) on chosen."})
    rejected_kl_weight: float = field(default=0.1, metadata={"help": "Weight of KL(teacher‖student) on rejected."})


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
    if config.top_k < 1:
        raise ValueError(f"{name}: top_k must be >= 1, found {config.top_k}")


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
        mode = "train" if self.model.training else "eval"
        for key, value in values.items():
            self._metrics[mode][key].append(self.accelerator.gather(value.detach().float()).mean().item())


class DCKDTrainer(TeacherPairTrainer):
    """DCKD (specs/dckd_adpa.md §3) on TRL's DPOTrainer. Arguments as `DPOTrainer`, plus `teacher_model` (a path or
    a loaded model; default `args.teacher_model_name_or_path`) for `teacher_mode="live"`.

    Logged: `loss/sft`, `kl/chosen`, `kl/rejected` (each before its weight).
    """

    _name = "DCKD"
    _tag_names = ["trl", "align-distill", "dckd"]

    def __init__(
        self,
        model: Any,
        args: DCKDConfig,
        train_dataset: Any,
        processing_class: Any,
        teacher_model: Any = None,
        **kwargs: Any,
    ):
        super().__init__(model, args, train_dataset, processing_class, **kwargs)
        self.teacher = None
        if args.teacher_mode == "live":
            teacher = teacher_model or args.teacher_model_name_or_path
            self.teacher = self._frozen(
                load_teacher(teacher, self._tokenizer, args.teacher_dtype, "teacher", args.trust_remote_code)
            )
            return
        reader = TeacherSignalReader(args.signals_path, [args.teacher_name], ["chosen", "rejected"])
        for dataset in [self.train_dataset, *self._eval_datasets()]:
            reader.check_dataset(dataset, {"chosen": "chosen_ids", "rejected": "rejected_ids"})

        def layout(examples: list[dict[str, Any]]) -> list[tuple[str, str]]:
            ids = [str(example["id"]) for example in examples]
            return [(i, "chosen") for i in ids] + [(i, "rejected") for i in ids]

        self.data_collator = SignalsCollator(
            self.data_collator, reader, layout, lambda n: slice(None), {args.teacher_name: "teacher_"}
        )

    def _eval_datasets(self) -> list[Any]:
        if self.eval_dataset is None:
            return []
        return list(self.eval_dataset.values()) if isinstance(self.eval_dataset, dict) else [self.eval_dataset]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        outputs = self._student_outputs(model, inputs)
        logits, labels, mask = self._aligned(outputs.logits, inputs)
        half = inputs["input_ids"].shape[0] // 2
        parts = {"loss/sft": self._sft(logits[:half], labels[:half], mask[:half])}
        teacher_logits = self._teacher_logits(self.teacher, inputs) if self.teacher is not None else None
        for name, rows, weight in (
            ("chosen", slice(None, half), args.chosen_kl_weight),
            ("rejected", slice(half, None), args.rejected_kl_weight),
        ):
            if weight == 0:
                continue
            if teacher_logits is not None and args.loss_mode == "paper":
                kl = kd_loss(
                    logits[rows],
                    teacher_logits[rows],
                    mask[rows],
                    chunk_size=args.loss_chunk_size,
                    reduction=args.loss_reduction,
                )
            else:
                if teacher_logits is not None:
                    live = live_signals(teacher_logits[rows], labels[rows], args.top_k)
                    ids, logprobs = live.ids, live.logprobs
                else:
                    ids, logprobs = inputs["teacher_ids"][rows], inputs["teacher_logprobs"][rows]
                kl = topk_kd_loss(
                    logits[rows],
                    ids,
                    logprobs,
                    mask[rows],
                    mode=args.loss_mode,
                    chunk_size=args.loss_chunk_size,
                    reduction=args.loss_reduction,
                )
            parts[f"kl/{name}"] = kl
        loss = args.sft_weight * parts["loss/sft"]
        loss = loss + args.chosen_kl_weight * parts.get("kl/chosen", 0.0)
        loss = loss + args.rejected_kl_weight * parts.get("kl/rejected", 0.0)
        self._record(parts)
        return (loss, outputs) if return_outputs else loss
