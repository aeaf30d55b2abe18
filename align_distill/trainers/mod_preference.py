"""LLaVA-MoD stage 2, preference distillation (docs/methods/llava_mod.md §5):
`MoDPreferenceConfig`, `MoDPreferenceTrainer`.

TRL's DPOTrainer with the frozen **teacher as the reference model**: TRL collates (text or vision preference
batches, chosen and rejected stacked), scores the summed response log-probs with its fused LM head, and runs or
precomputes the reference; the loss is `align_distill.losses.teacher_ref_preference_loss` (`sigmoid` = DPO, the
project default, or `kto_pair`, the released script's), plus 0.01 · (ℓ_aux over the chosen pass + ℓ_aux over the
rejected pass) for an MoE student. The KD loss is not kept; the chosen answer's CE is logged (`sft_loss`), not
optimised (docs/methods/llava_mod.md §5.2).

Teacher log-probs come from (in this order): a `ref_chosen_logps` / `ref_rejected_logps` column already in the
data (e.g. from the teacher-signal cache, `teacher_logps_from_signals`), a pass over the data before training
(`precompute_ref_log_probs=True`, after which the teacher is dropped from memory), or the live teacher per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer

from align_distill.data.tokens import encode_prompt_responses
from align_distill.losses import teacher_ref_preference_loss
from align_distill.teachers.sources import SignalsRequest
from align_distill.trainers.common import (
    DPO_LOSS_OPTIONS,
    DPO_REFERENCE_SYNC,
    default_precision,
    right_padded_batch,
)
from align_distill.vocabulary import reject_ignored_fields

from .mod_mimic import RouterLogits, balancing_loss, set_stage_trainable

logger = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "kto_pair")
TEACHER_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_NON_MODEL_KEYS = {"completion_mask", *TEACHER_COLUMNS}


@dataclass
class MoDPreferenceConfig(DPOConfig):
    r"""
    Configuration for [`MoDPreferenceTrainer`]: TRL's `DPOConfig` with the teacher as the reference.

    > Parameters that control the loss

    loss_type (`str`, defaults to `"sigmoid"`):
        `sigmoid` (DPO against the teacher; project default, arXiv v1) or `kto_pair` (the released script).
    beta (`float`, defaults to `0.1`):
        β of both losses.
    aux_loss_weight (`float`, defaults to `0.01`):
        Weight of the MoE load-balancing loss, once per pass (chosen, rejected); only an MoE student has one.
    balancing_convention (`str`, defaults to `"deepspeed"`):
        `deepspeed` (the method page's ℓ_aux) or `transformers`.

    > Parameters that control the model

    trainable (`str`, defaults to `"auto"`):
        `d2s`: FFN / experts / routers + projector; `all`: every parameter but a vision tower; `auto`: `d2s`
        for an MoE student, `all` for a dense one.

    Changed defaults from `DPOConfig`: learning_rate 2e-6 (method doc), `bf16=None` (bf16 only on a CUDA device that
    supports it). `precompute_ref_log_probs=True` scores the data with the teacher once, then frees it. DPO fields
    that loss never reads (`loss_weights`, `label_smoothing`, the f-divergence and reference-sync options, ...) are
    rejected when set.

    Deprecated key (one release): `aux_loss_coef` → `aux_loss_weight`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {"aux_loss_coef": "aux_loss_weight"}
    ignored_fields: ClassVar[dict[str, str]] = {
        **dict.fromkeys(
            (*DPO_LOSS_OPTIONS, "label_smoothing_factor"),
            "the loss is `teacher_ref_preference_loss` (sigmoid or kto_pair)",
        ),
        "router_aux_loss_coef": "the balancing loss is weighted by `aux_loss_weight`",
        **dict.fromkeys(DPO_REFERENCE_SYNC, "the reference is the frozen teacher"),
    }
    method_label: ClassVar[str] = "LLaVA-MoD preference distillation (pd)"

    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "sigmoid (DPO, teacher as reference) or kto_pair.", "choices": list(LOSS_TYPES)},
    )
    aux_loss_weight: float = field(default=0.01, metadata={"help": "Weight of the MoE load-balancing loss per pass."})
    balancing_convention: str = field(
        default="deepspeed",
        metadata={
            "help": "Balancing loss: deepspeed (docs/methods/llava_mod.md) or transformers.",
            "choices": ["deepspeed", "transformers"],
        },
    )
    trainable: str = field(
        default="auto", metadata={"help": "Trainable set: auto, d2s or all.", "choices": ["auto", "d2s", "all"]}
    )
    learning_rate: float = field(default=2e-6, metadata={"help": "Initial learning rate (method doc: 2e-6)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 (None: only on a CUDA device that supports it)."})

    def __post_init__(self) -> None:

        default_precision(self)
        reject_ignored_fields(self)  # the values as given, before TRL resolves them
        super().__post_init__()  # makes loss_type a list
        if len(self.loss_type) != 1 or self.loss_type[0] not in LOSS_TYPES:
            raise ValueError(f"MoDPreferenceConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type}")
        if self.trainable not in ("auto", "d2s", "all"):
            raise ValueError(f"MoDPreferenceConfig.trainable must be auto, d2s or all, got {self.trainable!r}")


class _WithTeacherLogps:
    """Pass `ref_chosen_logps` / `ref_rejected_logps` columns through a collator that drops them (TRL's vision one)."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        present = [c for c in TEACHER_COLUMNS if c in examples[0]]
        values = {c: torch.tensor([float(e[c]) for e in examples]) for c in present}
        batch = self.collator(examples)
        batch.update(values)
        return batch


class MoDPreferenceTrainer(DPOTrainer):
    """DPOTrainer whose reference is the teacher and whose loss is `teacher_ref_preference_loss` (module docstring).

    `teacher_model` is the frozen dense teacher (same tokenizer as the student). It may be omitted when the training
    data already holds the teacher's summed log-probs (`ref_chosen_logps`, `ref_rejected_logps`).
    """

    _tag_names = ["trl", "dpo", "align-distill", "llava-mod"]

    def __init__(
        self,
        model: nn.Module,
        teacher_model: nn.Module | None = None,
        args: MoDPreferenceConfig | None = None,
        train_dataset: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            raise ValueError("MoDPreferenceTrainer needs an MoDPreferenceConfig (args)")
        if "ref_model" in kwargs:
            raise TypeError("MoDPreferenceTrainer: pass the teacher as teacher_model (it is the reference)")
        if isinstance(model, str):
            raise TypeError("MoDPreferenceTrainer expects a loaded model (the trainable set is applied first)")
        self.router_logits = RouterLogits(model)
        trainable = args.trainable
        if trainable == "auto":
            trainable = "d2s" if self.router_logits.routers else "all"
        self.trainable_names = set_stage_trainable(model, "d2s" if trainable == "d2s" else "d2d")
        given = train_dataset is not None and all(c in train_dataset.column_names for c in TEACHER_COLUMNS)
        vision = train_dataset is not None and bool({"image", "images"} & set(train_dataset.column_names))
        if teacher_model is None:
            if not given:
                raise ValueError(
                    "MoDPreferenceTrainer needs a teacher_model, or training data with the teacher's summed "
                    f"log-probs in columns {TEACHER_COLUMNS} (see teacher_logps_from_signals)"
                )
            # read from the data: TRL then keeps no reference model (our _precompute_ref_logps keeps the columns)
            args.precompute_ref_log_probs = not vision
        # TRL refuses to precompute on vision data (it would process every image up front); the teacher pass over
        # the data is what we want here (the teacher then leaves memory), so it is done below, after TRL's init
        precompute_vision = vision and args.precompute_ref_log_probs and teacher_model is not None
        if precompute_vision:
            args.precompute_ref_log_probs = False
        super().__init__(model=model, ref_model=teacher_model, args=args, train_dataset=train_dataset, **kwargs)
        self.loss_type = args.loss_type[0]
        if precompute_vision:
            self.train_dataset = self._teacher_pass(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._teacher_pass(v) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._teacher_pass(self.eval_dataset)
            args.precompute_ref_log_probs = True
        self.data_collator = _WithTeacherLogps(self.data_collator)
        if args.precompute_ref_log_probs or teacher_model is None:
            self.ref_model = None  # the teacher's log-probs are in the data now; free it

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [c for c in TEACHER_COLUMNS if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if all(c in dataset.column_names for c in TEACHER_COLUMNS):
            return dataset  # teacher log-probs given with the data
        if self.ref_model is None:
            raise ValueError(f"{name} dataset has no teacher log-probs and no teacher model was given")
        return super()._precompute_ref_logps(dataset, name, batch_size)

    @torch.no_grad()
    def _teacher_pass(self, dataset):
        """Add the teacher's summed log-probs of each row's chosen / rejected answer as columns (one pass, every
        process scores the whole dataset; vision data, where TRL does not precompute)."""

        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.compute_ref_log_probs(self.ref_model, self._prepare_inputs(batch))
            chosen.extend(c.float().cpu().tolist())
            rejected.extend(r.float().cpu().tolist())
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    def _teacher_logps(self, inputs: dict[str, Any], model_kwargs: dict[str, Any], labels: torch.Tensor):
        if all(c in inputs for c in TEACHER_COLUMNS):
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.ref_model is None:
            raise ValueError("no teacher log-probs in the batch and no teacher model to compute them")
        with torch.no_grad():
            teacher = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = labels.size(1) - 1
        return teacher.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        args: MoDPreferenceConfig = self.args
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        with self.router_logits as router:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        per_token_logps = outputs.log_probs[:, -seq_len:]
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)  # batch is [chosen; rejected]
        teacher_chosen, teacher_rejected = self._teacher_logps(inputs, model_kwargs, labels)
        loss, chosen_rewards, rejected_rewards = teacher_ref_preference_loss(
            chosen_logps,
            rejected_logps,
            teacher_chosen.to(chosen_logps.device),
            teacher_rejected.to(chosen_logps.device),
            beta=self.beta,
            loss_type=self.loss_type,
        )
        metrics: dict[str, torch.Tensor] = {}
        if router.logits and args.aux_loss_weight:
            aux = self._balancing_per_pass(router.logits, inputs["attention_mask"])
            loss = loss + args.aux_loss_weight * aux
            metrics["aux_loss"] = aux.detach()

        with torch.no_grad():
            chosen_mask = completion_mask[:, 1:].chunk(2, dim=0)[0].bool()
            chosen_tokens = per_token_logps.chunk(2, dim=0)[0][chosen_mask]
            metrics["sft_loss"] = -chosen_tokens.mean() if chosen_tokens.numel() else loss.new_zeros(())
        gather = self.accelerator.gather_for_metrics
        for name, value in metrics.items():
            self._metrics[mode][name].append(gather(value).mean().item())
        self._metrics[mode]["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        self._metrics[mode]["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        self._metrics[mode]["rewards/accuracies"].append(
            gather((chosen_rewards > rejected_rewards).float()).mean().item()
        )
        self._metrics[mode]["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        self._metrics[mode]["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        self._metrics[mode]["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        self._metrics[mode]["teacher_logps/chosen"].append(gather(teacher_chosen.to(loss.device)).mean().item())
        self._metrics[mode]["teacher_logps/rejected"].append(gather(teacher_rejected.to(loss.device)).mean().item())
        if mode == "train":
            self._total_train_tokens += int(gather(inputs["attention_mask"].sum()).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _balancing_per_pass(self, router_logits: list[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """ℓ_aux summed over layers, for the chosen pass plus the rejected pass (the official code runs two)."""
        batch, length = attention_mask.shape
        per_pass = []
        for half, mask in enumerate(attention_mask.chunk(2, dim=0)):
            layers = [
                logits.reshape(batch, length, -1).chunk(2, dim=0)[half].reshape(-1, logits.shape[-1])
                for logits in router_logits
            ]
            per_pass.append(
                balancing_loss(
                    layers,
                    mask,
                    self.router_logits.top_k,
                    self.router_logits.num_experts,
                    self.args.balancing_convention,
                )
            )
        return per_pass[0] + per_pass[1]


def teacher_logps_from_signals(dataset: Any, signals: Any, teacher: str | None = None) -> Any:
    """Add the teacher's summed response log-probs from a `signals` cache (`load_signals`) as the
    `ref_chosen_logps` / `ref_rejected_logps` columns, matched by the rows' `id`.

    The cache stores each response token's own teacher log-prob (`token_logprobs`); their sum is the sequence
    log-prob the loss needs (docs/methods/llava_mod.md §5.1: summed, not averaged).
    """
    name = teacher or signals.teachers[0]["name"]
    missing = [c for c in ("chosen", "rejected") if c not in signals.responses]
    if missing:
        raise ValueError(f"the signals cache has no {missing} responses (it has {signals.responses})")

    def add(row: dict[str, Any]) -> dict[str, float]:
        cached = signals[row["id"]]
        return {
            f"ref_{r}_logps": float(cached.responses[r].teachers[name].token_logprobs.double().sum())
            for r in ("chosen", "rejected")
        }

    return dataset.map(add)


def teacher_logps_from_source(dataset: Any, source: Any, tokenizer: Any, batch_size: int = 16) -> Any:
    """`teacher_logps_from_signals` for a teacher source (e.g. a `ServerTeacher`): each row's chosen and rejected
    response, tokenized by the contract of `data.tokens` (as the `signals` job does), scored by the source; the
    sums of the response tokens' log-probs become `ref_chosen_logps` / `ref_rejected_logps` (text rows only)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def add(rows: dict[str, list[Any]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for response in ("chosen", "rejected"):
            pairs = encode_prompt_responses(tokenizer, rows["prompt"], rows[response])
            batch = right_padded_batch(pairs, pad)
            keys = [(str(i), response) for i in rows.get("id", range(len(pairs)))]
            request = SignalsRequest(keys, batch["input_ids"], batch["completion_mask"], batch["attention_mask"])
            signals = source.signals(request)
            mask = batch["completion_mask"][:, 1:].bool()
            sums = (signals.token_logprobs.double() * mask).sum(-1)
            out[f"ref_{response}_logps"] = sums.tolist()
        return out

    return dataset.map(add, batched=True, batch_size=batch_size, desc="Teacher log-probs")


__all__ = ["MoDPreferenceConfig", "MoDPreferenceTrainer", "teacher_logps_from_signals", "teacher_logps_from_source"]
