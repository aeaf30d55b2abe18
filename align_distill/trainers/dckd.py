"""DCKD: dual-constrained knowledge distillation from an aligned (DPO) teacher (docs/methods/dckd_adpa.md §3).

    L = sft_weight · NLL(chosen) + chosen_kl_weight · KL_chosen + rejected_kl_weight · KL_rejected

with KL = KL(π_dpo ‖ π_θ) on the dataset's chosen and rejected responses (prompt masked). `DCKDTrainer` is TRL's
`DPOTrainer` (tokenization, collation — `input_ids [2B, L]` chosen then rejected —, logging, saving) with the DPO
loss replaced: the trainer only lines up the student's logits with the teacher signals and calls
`align_distill.losses`. The teacher comes from the signal cache of `align-distill generate signals`
(`teacher_mode="cache"`, top-k + rest bucket, `topk_kd_loss`) or runs next to the student (`teacher_mode="live"`,
full vocabulary, `kd_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from align_distill.losses import kd_loss, topk_kd_loss

from .signals import TeacherSignalReader, live_signals
from .teacher import SignalsCollator, TeacherPairConfig, TeacherPairTrainer, load_teacher


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
                    live = live_signals(teacher_logits[rows], labels[rows], args.signals_top_k)
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
