"""DCKD: dual-constrained knowledge distillation from an aligned (DPO) teacher (docs/methods/dckd_adpa.md §3).

    L = sft_weight · NLL(chosen) + chosen_kl_weight · KL_chosen + rejected_kl_weight · KL_rejected

with KL = KL(π_dpo ‖ π_θ) on the dataset's chosen and rejected responses (prompt masked). `DCKDTrainer` is TRL's
`DPOTrainer` (tokenization, collation — `input_ids [2B, L]` chosen then rejected —, logging, saving) with the DPO
loss replaced: the trainer only lines up the student's logits with the teacher signals and calls
`align_distill.losses`. The teacher comes from the signal cache of `align-distill generate signals`
(`teacher_mode="cache"`, top-k + rest bucket, `topk_kd_loss`), from a vLLM server (`teacher_mode="server"`, the same
top-k form), from several teachers (`teachers`, the top-k form of their mixture) or runs next to the student
(`teacher_mode="model"`, full vocabulary, `kd_loss`; `official` mode: its top-k form).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .signals import live_signals
from .teacher import (
    SignalsCollator,
    TeacherPairConfig,
    TeacherPairTrainer,
    check_cached_rows,
    load_teacher,
    teacher_source,
)


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
    `official` mode is the (K+1)-bin KL with the official clamps (live: over the teacher's `signals_top_k` ids).
    DCKD has no β: `beta` is rejected when set.
    """

    ignored_fields: ClassVar[dict[str, str]] = {"beta": "DCKD's loss has no β"}
    method_label: ClassVar[str] = "DCKD"

    chosen_kl_weight: float = field(default=0.1, metadata={"help": "Weight of KL(teacher‖student) on chosen."})
    rejected_kl_weight: float = field(default=0.1, metadata={"help": "Weight of KL(teacher‖student) on rejected."})


class DCKDTrainer(TeacherPairTrainer):
    """DCKD (docs/methods/dckd_adpa.md §3) on TRL's DPOTrainer. Arguments as `DPOTrainer`, plus `teacher_model`
    (a path or
    a loaded model; default `args.teacher_model_name_or_path`) for `teacher_mode="model"`.

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
        if args.teacher_mode == "model" and not args.teachers:
            teacher = teacher_model or args.teacher_model_name_or_path
            self.teacher = self._frozen(
                load_teacher(teacher, self._tokenizer, args.teacher_dtype, "teacher", args.trust_remote_code)
            )
            return
        self.teacher_source = teacher_source(args, self._tokenizer, ["chosen", "rejected"], self._load_frozen)
        datasets = [self.train_dataset, *self._eval_datasets()]
        check_cached_rows(self.teacher_source, datasets, {"chosen": "chosen_ids", "rejected": "rejected_ids"})
        if args.teacher_routing_column:
            self.extra_columns = (*self.extra_columns, args.teacher_routing_column)

        def layout(examples: list[dict[str, Any]]) -> list[tuple[str, str]]:
            ids = [str(example["id"]) for example in examples]
            return [(i, "chosen") for i in ids] + [(i, "rejected") for i in ids]

        self.data_collator = SignalsCollator(
            self.data_collator,
            {"teacher_": self.teacher_source},
            layout,
            lambda n: slice(None),
            routing_column=args.teacher_routing_column,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        # paper mode with a live teacher: the full-vocabulary KL; official mode takes its top-k (from its logits)
        full = self.teacher is not None and args.loss_mode == "paper"
        scores, outputs = self._scores(model, inputs, (self.teacher,) if full else (), need_logits=return_outputs)
        half = inputs["input_ids"].shape[0] // 2
        parts = {"loss/sft": scores.nll(slice(None, half))}
        teacher = None
        if self.teacher is not None:
            teacher = self._live_teacher(self.teacher, inputs, fused=full and scores.student is not None)
        for name, rows, weight in (
            ("chosen", slice(None, half), args.chosen_kl_weight),
            ("rejected", slice(half, None), args.rejected_kl_weight),
        ):
            if weight == 0:
                continue
            if full:
                kl = scores.kd(rows, teacher)
            else:
                if teacher is not None:
                    live = live_signals(teacher[rows], scores.labels[rows], args.signals_top_k)
                    ids, logprobs = live.ids, live.logprobs
                else:
                    ids, logprobs = inputs["teacher_ids"][rows], inputs["teacher_logprobs"][rows]
                kl = scores.topk_kd(rows, ids, logprobs, mode=args.loss_mode)
            parts[f"kl/{name}"] = kl
        loss = args.sft_weight * parts["loss/sft"]
        loss = loss + args.chosen_kl_weight * parts.get("kl/chosen", 0.0)
        loss = loss + args.rejected_kl_weight * parts.get("kl/rejected", 0.0)
        self._record(parts)
        return (loss, outputs) if return_outputs else loss
