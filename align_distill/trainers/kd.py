"""KD: general knowledge distillation from one teacher on prompt/completion data (docs/methods/kd.md, "Trainer").

    L = D(teacher ‖ student)  +  sft_weight · NLL(completion)

D is `divergence` of `align_distill.losses.kd_loss` (live teacher, full vocabulary) or `topk_kd_loss` (the
teacher-signal cache of `align-distill generate signals`, top-k + rest bucket), on the completion tokens only.
The trainer only lines data up for the loss:

- **off-policy** (`lmbda = 0`, the default): the completions are the dataset's;
- **on-policy / mixed** (GKD, Agarwal et al. 2024; TRL's `lmbda`): each training micro-batch, with probability
  `lmbda`, has its completions replaced by the current student's own samples (`temperature`,
  `max_completion_length`). `rollout_backend: student` (default) draws them through data_gen's
  `TransformersGenerator` on the unwrapped student (as ADPA's `rollout_steps` does), so the samples always come
  from the weights being trained; `rollout_backend: vllm` draws them from a colocated vLLM engine
  (`trainers.rollouts.RolloutEngine`, shared with AlignDistil) whose weights are copied from the student every
  `rollout_sync_steps` optimizer steps (1 = the weights being trained, up to the current step's update). A
  prompt-only dataset means `lmbda = 1`: every batch, in training and evaluation, is sampled.
- **TAID** (`divergence: taid`, Shing et al. 2025): the interpolation t of the intermediate teacher
  softmax((1 − t)·stopgrad(z_student) + t·z_teacher) starts at `taid_t_start` and moves to 1 with TAID's adaptive
  schedule (`TAIDSchedule`, the official code's `update_t`), once per training micro-batch after its loss:

      δ_n = (J_{n−1} − J_n) / (J_{n−1} + 1e-15)          relative change of the TAID loss J (first batch: only J_0)
      m_n = taid_beta · m_{n−1} + (1 − taid_beta) · δ_n   momentum, m_0 = 0
      t_n = min(1, max(t_start + (1 − t_start) · step / max_steps,  t_{n−1} + taid_alpha · σ(m_n) · (1 − t_{n−1})))

  J is the batch's TAID loss averaged over processes (every rank keeps the same t), `step` the optimizer steps
  done. The state (t, m, J_{n−1}) is saved with each checkpoint (`taid_state.json`) and restored on resume.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer
from trl.models.utils import unwrap_model_for_generation

from align_distill.data.tokens import encode_prompt_responses, encode_prompts
from align_distill.data_gen.backends import SamplingParams, generate_with_seeds
from align_distill.data_gen.backends.transformers_backend import TransformersGenerator
from align_distill.losses.divergences import DIVERGENCE_PARAMS
from align_distill.models import check_model_vocab, shared_vocab_size, slice_logits_to_vocab
from align_distill.teachers.sources import teacher_specs
from align_distill.vocabulary import reject_ignored_fields

from .common import (
    LossOnlyPrediction,
    default_precision,
    frozen_logits,
    prepare_frozen,
    record_metrics,
    response_view,
    right_padded_batch,
)
from .fused_heads import FusedLMHeadMixin, ResponseScores
from .rollouts import RolloutEngine, rollout_seeds, zero3_enabled
from .teacher import (
    SignalsCollator,
    TeacherSourceConfig,
    check_cached_rows,
    check_teacher_mode,
    load_teacher,
    teacher_source,
)

logger = logging.getLogger(__name__)

# Each divergence of `kd_loss` / `topk_kd_loss` and the config fields that carry its parameters (taid_t: the schedule),
# read from the loss family's own table so that a divergence added there is a config choice here too.
DIVERGENCE_FIELDS: dict[str, tuple[str, ...]] = {
    name: tuple(p for p in params if p != "taid_t") for name, params in DIVERGENCE_PARAMS.items()
}
# The losses' defaults for a parameter the recipe leaves unset.
PARAM_DEFAULTS: dict[str, float] = {
    p: default for params in DIVERGENCE_PARAMS.values() for p, default in params.items() if default is not None
}
# Where on-policy samples come from: the live student in place, or a colocated vLLM engine synced from it.
ROLLOUT_BACKENDS = ("student", "vllm")
TAID_STATE = "taid_state.json"


@dataclass
class KDConfig(SFTConfig, TeacherSourceConfig):
    r"""Configuration of [`KDTrainer`]: TRL's `SFTConfig` plus the teacher, the divergence and on-policy sampling.

    Why `SFTConfig`: KD trains on SFT data (prompt/completion, plain or conversational), and TRL's own mixed
    on/off-policy distiller, `GKDConfig`, extends `SFTConfig` too — so `lmbda`, `beta`, `temperature` and
    `teacher_model_name_or_path` mean here what they mean in GKD. TRL's `DistillationConfig` is for its
    on-policy-only trainer on prompt datasets (with its own vLLM settings); its `max_completion_length` is the name
    used here for the sample length (GKD's `max_new_tokens` is accepted as a deprecated key).

    Parameters:
        > Parameters that control the teacher

        teacher_mode (`str`, *optional*, defaults to `"model"`):
            Where the teacher runs (docs/teachers.md). `model`: load `teacher_model_name_or_path` next to the
            student and use its full logits (`kd_loss`). `cache`: read the teacher's top-k log-probs from
            `signals_path` (`topk_kd_loss`, no teacher in memory); off-policy only, since the cache holds the
            dataset's fixed completions. `server`: ask the vLLM server at `teacher_server_url` for the top-k
            log-probs of every batch (`topk_kd_loss`; on-policy samples too). `live` is the deprecated name of
            `model` (one release).
        teacher_model_name_or_path (`str`, *optional*):
            The teacher (`model`). Must share the student's tokenizer (checked).
        teacher_dtype (`str`, *optional*, defaults to `"auto"`):
            dtype the in-process teacher is loaded in.
        signals_path (`str`, *optional*):
            Teacher-signal cache (`align-distill generate signals` on this dataset's `completion`s).
        teacher_name (`str`, *optional*, defaults to `"teacher"`):
            Name of the teacher's signals in the cache (the signals job's `teachers[].name`).
        teacher_server_url (`str`, *optional*), teacher_server_model (`str`, *optional*),
        teacher_server_kwargs (`dict`, *optional*):
            The teacher's vLLM server (`teacher_mode="server"`): OpenAI base URL, served model name (default: its
            first) and client settings (`api_key_env`, `max_concurrency`, `timeout`, `max_retries`, ...).
        signals_top_k (`int`, *optional*, defaults to `50`):
            Served teachers and the in-process members of `teachers`: ids per position.
        teachers (`list[dict]`, *optional*), teacher_routing_column (`str`, *optional*):
            Several teachers (docs/teachers.md, "Several teachers"): `{name, kind, weight, model_name_or_path |
            signals_path | server_url, server_model}` each, mixed by weight over the union of their top-k ids, or
            routed per row by the dataset column `teacher_routing_column`. The loss is the top-k form.

        > Parameters that control the loss (docs/methods/kd.md)

        divergence (`str`, *optional*, defaults to `"forward_kl"`):
            `forward_kl`, `reverse_kl`, `jsd`, `skew_forward_kl`, `skew_reverse_kl`, `tvd`, `akl` or `taid`.
        beta (`float`, *optional*):
            `jsd` only: m = (1 − β)·p_student + β·p_teacher (GKD's β: 0 forward, 1 reverse KL). Unset: 0.5.
        alpha (`float`, *optional*):
            `skew_forward_kl` / `skew_reverse_kl` only: the skew α. Unset: 0.1.
        mu (`float`, *optional*):
            `akl` only: the head/tail threshold μ. Unset: 0.5.
        taid_t_start (`float`, *optional*, defaults to `0.4`):
            `taid` only: the interpolation t at the start (official default 0.4).
        taid_alpha (`float`, *optional*, defaults to `5e-4`):
            `taid` only: step size of the adaptive update (official `--taid_alpha`).
        taid_beta (`float`, *optional*, defaults to `0.99`):
            `taid` only: momentum of the relative loss change (official `--taid_beta`).
        temperature (`float`, *optional*, defaults to `1.0`):
            Divides both logits in the divergence (no T² factor) and is the sampling temperature of on-policy
            samples, as in TRL's `DistillationConfig`.
        sft_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the NLL of the completion (the dataset's, or the student's sample on on-policy batches).
        loss_reduction (`str`, *optional*, defaults to `"token_mean"`):
            `token_mean` (pooled over the micro-batch) or `sequence_mean`.
        loss_chunk_size (`int`, *optional*):
            Positions per chunk of the vocabulary-wide loss work (logits path; bounds peak memory); `None` picks
            ~2 MiB chunks.
        fused_lm_head (`bool`, *optional*, defaults to `True`):
            The loss from hidden states and LM heads in vocabulary tiles, no `[B, T, V]` logits; `False`: the
            logits path (`FusedLMHeadConfig`).

        > Parameters that control on-policy samples

        lmbda (`float`, *optional*, defaults to `0.0`):
            Probability that a training micro-batch trains on the student's own samples instead of the dataset's
            completions (GKD's λ; 0 = off-policy, 1 = fully on-policy).
        max_completion_length (`int`, *optional*, defaults to `128`):
            Longest sampled completion, in tokens.
        rollout_backend (`str`, *optional*, defaults to `"student"`):
            `student`: generate with the live student itself (transformers). `vllm`: a colocated vLLM engine
            started from the student's folder, its weights copied from the student (shared with AlignDistil).
        rollout_backend_kwargs (`dict`, *optional*):
            `vllm` only: keyword arguments of the engine (`data_gen.make_generator`), e.g.
            `{"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.3}`.
        rollout_sync_steps (`int`, *optional*, defaults to `1`):
            `vllm` only: copy the student's weights into the engine every this many optimizer steps.

    TRL fields the KD loss and collator never read (`loss_type`, `label_smoothing_factor`, `router_aux_loss_coef`,
    `completion_only_loss`, `assistant_only_loss`, `packing`, `padding_free`) are rejected when set. Changed
    default: `bf16=None` means bf16 only on a CUDA device that supports it.

    Deprecated key (one release): `max_new_tokens` → `max_completion_length`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {"max_new_tokens": "max_completion_length"}
    ignored_fields: ClassVar[dict[str, str]] = {
        "loss_type": "the SFT loss is replaced by the distillation loss; sft_weight adds the NLL",
        "label_smoothing_factor": "the SFT loss is replaced by the distillation loss",
        "router_aux_loss_coef": "the distillation loss has no MoE load-balancing term",
        "completion_only_loss": "KD always scores the completion only",
        "assistant_only_loss": "KD always scores the completion only",
        "packing": "KD's collator pads prompt + completion rows; it does not pack",
        "padding_free": "KD's collator pads prompt + completion rows",
    }
    method_label: ClassVar[str] = "KD"

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["rollout_backend_kwargs", "teacher_server_kwargs"]

    # teacher
    teacher_mode: Literal["model", "cache", "server", "live"] = field(
        default="model",
        metadata={"help": "model: run the teacher (full logits); cache / server: top-k signals (live: model)."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher (teacher_mode=model)."}
    )
    teacher_dtype: str = field(default="auto", metadata={"help": "dtype of the in-process teacher."})
    signals_path: str | None = field(
        default=None, metadata={"help": "Teacher-signal cache on this dataset's completions (teacher_mode=cache)."}
    )
    teacher_name: str = field(default="teacher", metadata={"help": "Name of the teacher's signals in the cache."})
    # loss
    divergence: str = field(
        default="forward_kl", metadata={"help": "Divergence of the loss.", "choices": list(DIVERGENCE_FIELDS)}
    )
    beta: float | None = field(default=None, metadata={"help": "jsd: mixture weight β (unset: 0.5)."})
    alpha: float | None = field(default=None, metadata={"help": "skew_*_kl: skew α (unset: 0.1)."})
    mu: float | None = field(default=None, metadata={"help": "akl: head/tail threshold μ (unset: 0.5)."})
    taid_t_start: float = field(default=0.4, metadata={"help": "taid: interpolation t at the start."})
    taid_alpha: float = field(default=5e-4, metadata={"help": "taid: step size of the adaptive update of t."})
    taid_beta: float = field(default=0.99, metadata={"help": "taid: momentum of the relative loss change."})
    temperature: float = field(default=1.0, metadata={"help": "Loss temperature and sampling temperature."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of the NLL on the completion."})
    loss_reduction: Literal["token_mean", "sequence_mean"] = field(
        default="token_mean", metadata={"help": "token_mean (pooled over the micro-batch) or sequence_mean."}
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk of the vocabulary-wide loss work (None: automatic)."}
    )
    # on-policy
    lmbda: float = field(
        default=0.0, metadata={"help": "Probability that a batch trains on the student's own samples (GKD's λ)."}
    )
    max_completion_length: int = field(default=128, metadata={"help": "Longest sampled completion in tokens."})
    rollout_backend: str = field(
        default="student",
        metadata={"help": "student: sample with the live student; vllm: a colocated vLLM engine synced from it.",
                  "choices": list(ROLLOUT_BACKENDS)},
    )  # fmt: skip
    rollout_backend_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "vllm: keyword arguments of the engine (JSON on the command line)."}
    )
    rollout_sync_steps: int = field(
        default=1, metadata={"help": "vllm: copy student weights into the engine every N optimizer steps."}
    )

    def __post_init__(self) -> None:
        default_precision(self)
        reject_ignored_fields(self)  # the values as given, before TRL resolves them
        super().__post_init__()
        problems = check_kd_config(self)
        if problems:
            raise ValueError("KDConfig: " + "; ".join(problems))

    def divergence_params(self) -> dict[str, float]:
        """The parameters `kd_loss` / `topk_kd_loss` take for `divergence` (taid_t excluded: the schedule's)."""
        params = {}
        for name in DIVERGENCE_FIELDS[self.divergence]:
            value = getattr(self, name)
            params[name] = PARAM_DEFAULTS[name] if value is None else value
        return params


def check_kd_config(config: KDConfig) -> list[str]:
    """Everything wrong with a KD config, as sentences (empty when it is fine)."""
    problems = []
    if config.divergence not in DIVERGENCE_FIELDS:
        return [f"unknown divergence {config.divergence!r}; expected one of {', '.join(DIVERGENCE_FIELDS)}"]
    for name in ("beta", "alpha", "mu"):
        value = getattr(config, name)
        if value is None:
            continue
        if name not in DIVERGENCE_FIELDS[config.divergence]:
            users = [d for d, fields in DIVERGENCE_FIELDS.items() if name in fields]
            problems.append(f"`{name}` is a parameter of {' / '.join(users)}, not of divergence {config.divergence}")
        elif not 0.0 <= value <= 1.0:
            problems.append(f"{name} must lie in [0, 1], found {value}")
    if not 0.0 <= config.taid_t_start < 1.0:
        problems.append(f"taid_t_start must lie in [0, 1), found {config.taid_t_start}")
    if not 0.0 <= config.taid_alpha <= 1.0 or not 0.0 <= config.taid_beta < 1.0:
        problems.append(f"taid_alpha must lie in [0, 1] and taid_beta in [0, 1), found {config.taid_alpha}, "
                        f"{config.taid_beta}")  # fmt: skip
    if not 0.0 <= config.lmbda <= 1.0:
        problems.append(f"lmbda must lie in [0, 1], found {config.lmbda}")
    if config.temperature <= 0:
        problems.append(f"temperature must be > 0, found {config.temperature}")
    if config.sft_weight < 0:
        problems.append(f"sft_weight must be >= 0, found {config.sft_weight}")
    if config.max_completion_length < 1:
        problems.append(f"max_completion_length must be >= 1, found {config.max_completion_length}")
    problems += check_rollout_backend(config)
    try:
        check_teacher_mode(config, model_fields=("teacher_model_name_or_path",), server_fields=("teacher_server_url",))
    except ValueError as error:
        return [*problems, str(error).removeprefix("KDConfig: ")]
    specs = teacher_specs(config.teachers, "KDConfig.teachers") if config.teachers else []
    top_k_form = bool(specs) or config.teacher_mode != "model"
    cached = any(s.kind == "cache" for s in specs) or (not specs and config.teacher_mode == "cache")
    if top_k_form and config.temperature != 1.0:
        problems.append(
            f"teacher_mode={config.teacher_mode} gives the teacher's log-probs at temperature 1, found temperature="
            f"{config.temperature}; use teacher_mode=model for a loss temperature"
        )
    if cached and config.lmbda > 0:
        problems.append(
            f"teacher_mode=cache is off-policy only (the cache holds the dataset's fixed completions), found "
            f"lmbda={config.lmbda}; use teacher_mode=model or server for on-policy samples or set lmbda: 0"
        )
    return problems


def check_rollout_backend(config: KDConfig) -> list[str]:
    """Problems with `rollout_backend` and the settings only the vLLM engine reads."""
    if config.rollout_backend not in ROLLOUT_BACKENDS:
        return [f"rollout_backend must be one of {', '.join(ROLLOUT_BACKENDS)}, found {config.rollout_backend!r}"]
    problems = []
    if config.rollout_sync_steps < 1:
        problems.append(f"rollout_sync_steps must be >= 1, found {config.rollout_sync_steps}")
    if config.rollout_backend == "student":
        unused = [
            f"{name}={getattr(config, name)!r}"
            for name, default in (("rollout_backend_kwargs", None), ("rollout_sync_steps", 1))
            if getattr(config, name) != default
        ]
        if unused and config.rollout_sync_steps >= 1:
            problems.append(
                f"{' and '.join(unused)} only apply to rollout_backend=vllm (the student backend samples from the "
                "live student, always in sync); set rollout_backend: vllm or drop them"
            )
    elif config.lmbda == 0:
        problems.append(
            "rollout_backend=vllm samples the on-policy completions, but lmbda=0 never samples; set lmbda > 0 or "
            "drop rollout_backend"
        )
    return problems


# ---- TAID's schedule of t -------------------------------------------------------------------------------------------


@dataclass
class TAIDSchedule:
    """TAID's adaptive interpolation schedule (Shing et al. 2025; the official code's `TAID.update_t`).

    `update(loss, step, total_steps)` after each training batch's TAID loss J_n (see the module docstring):
    the momentum m of the relative loss decrease speeds t up while the loss falls fast, and t never falls behind
    the linear schedule t_start → t_end over the training steps, nor passes t_end. The first call only records J_0.
    """

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    t: float | None = None
    momentum: float = 0.0
    prev_loss: float | None = None

    def __post_init__(self) -> None:
        if self.t is None:
            self.t = self.t_start

    def update(self, loss: float, step: int, total_steps: int) -> float:
        """Advance t after a batch whose TAID loss is `loss`, `step` optimizer steps into `total_steps`; new t."""
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
        adaptive_delta = 1.0 / (1.0 + math.exp(-self.momentum))  # σ(m)
        t_target = self.t_start + (self.t_end - self.t_start) * step / max(total_steps, 1)
        delta_t = self.alpha * adaptive_delta * (1 - self.t)
        self.t = min(self.t_end, max(t_target, self.t + delta_t))
        self.prev_loss = loss
        return self.t


# ---- data -----------------------------------------------------------------------------------------------------------


def tokenize_completions(dataset: Any, tokenizer: Any, extra_columns: tuple[str, ...] = ()) -> Any:
    """`prompt_ids` and `completion_ids` of every row by the tokenization contract (`data.tokens`: the ids the
    `signals` job computes the cache on); a prompt-only dataset gets `prompt_ids` only. `extra_columns` are kept
    (a teacher routing column)."""
    has_completion = "completion" in dataset.column_names

    def tokenize(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not has_completion:
            return {"prompt_ids": encode_prompts(tokenizer, rows["prompt"])}
        pairs = encode_prompt_responses(tokenizer, rows["prompt"], rows["completion"])
        return {"prompt_ids": [p for p, _ in pairs], "completion_ids": [c for _, c in pairs]}

    keep = [c for c in ("id", "prompt", "completion", *extra_columns) if c in dataset.column_names]
    return dataset.select_columns(keep).map(tokenize, batched=True, desc="Tokenizing KD rows")


@dataclass
class KDCollator:
    """Rows `prompt_ids + completion_ids` → `input_ids`, `attention_mask`, `completion_mask` (`[B, L]`, right-padded,
    each sequence cut to `max_length`); the raw `prompt`s too when `keep_prompts` (for on-policy samples). Rows
    without completions (a prompt-only dataset) give the prompts only."""

    pad_token_id: int
    max_length: int | None = None
    keep_prompts: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if "completion_ids" in examples[0]:
            batch = self.build([(e["prompt_ids"], e["completion_ids"]) for e in examples])
        if self.keep_prompts or not batch:
            batch["prompt"] = [e["prompt"] for e in examples]
        return batch

    def build(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return right_padded_batch(sequences, self.pad_token_id, self.max_length)


# ---- trainer --------------------------------------------------------------------------------------------------------


class KDTrainer(FusedLMHeadMixin, LossOnlyPrediction, SFTTrainer):
    """KD (docs/methods/kd.md, "Trainer") on TRL's `SFTTrainer`; see the module docstring.

    Args:
        model: the student (a path or a model).
        args: a `KDConfig`.
        train_dataset, eval_dataset: prompt/completion rows (plain or conversational; `id` needed for the cache),
            or prompt-only rows with `lmbda = 1`.
        processing_class: the student's tokenizer (shared with the teacher).
        teacher_model: a path or loaded model overriding `args.teacher_model_name_or_path` (`teacher_mode=model`).

    Logged: `kd/loss` (the divergence), `kd/sft` (when `sft_weight > 0`), `kd/on_policy_fraction` (share of
    training batches on student samples), `kd/completion_tokens`, `taid/t` (the t each batch used).
    """

    _tag_names = ["trl", "align-distill", "kd"]
    _name = "KD"
    loss_is_scaled_for_ga = False  # the loss is a per-batch mean: the Trainer divides it by accumulation steps

    def __init__(
        self,
        model: Any,
        args: KDConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        teacher_model: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
    ):
        if args is None:
            raise ValueError("KDTrainer needs a KDConfig (args)")
        if processing_class is None:
            raise ValueError("KDTrainer needs the student's tokenizer (processing_class)")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        extra = (args.teacher_routing_column,) if args.teacher_routing_column else ()
        train_dataset = tokenize_completions(train_dataset, tokenizer, extra)
        if eval_dataset is not None:
            eval_dataset = tokenize_completions(eval_dataset, tokenizer, extra)
        self.prompt_only = "completion_ids" not in train_dataset.column_names
        if self.prompt_only and args.lmbda < 1.0:
            raise ValueError(
                f"KD: the dataset has prompts only, so every batch needs the student's samples; set lmbda: 1 "
                f"(found {args.lmbda}) or give prompt/completion rows"
            )
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        collator = KDCollator(tokenizer.pad_token_id, args.max_length, keep_prompts=args.lmbda > 0)
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        self.vocab_size = shared_vocab_size(tokenizer)
        check_model_vocab(self.accelerator.unwrap_model(self.model), tokenizer, "student")
        self.kd_collator = collator
        self.teacher = None
        if args.teacher_mode == "model" and not args.teachers:
            teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
            teacher = load_teacher(teacher, tokenizer, args.teacher_dtype, "teacher", args.trust_remote_code)
            self.teacher = prepare_frozen(teacher, self.accelerator, self.is_deepspeed_enabled)
        else:
            self._use_teacher_source()
        self.taid = (
            TAIDSchedule(t_start=args.taid_t_start, alpha=args.taid_alpha, beta=args.taid_beta)
            if args.divergence == "taid"
            else None
        )
        self._draws = random.Random(args.seed)  # same seed on every rank: all ranks sample on the same batches
        self._samples = 0
        # rollout_backend=vllm: the colocated engine, built at the first sample and closed at the end of `train`
        self.rollouts = RolloutEngine(args, tokenizer, self.accelerator) if args.rollout_backend == "vllm" else None

    def _use_teacher_source(self) -> None:
        """Top-k teacher signals from the cache, a server or several teachers, added to each batch by the collator
        (and again on the student's samples, which only a model or server teacher can score)."""
        args = self.args

        def load(path: str, name: str) -> Any:
            model = load_teacher(path, self._tokenizer, args.teacher_dtype, name, args.trust_remote_code)
            return prepare_frozen(model, self.accelerator, self.is_deepspeed_enabled)

        self.teacher_source = teacher_source(args, self._tokenizer, ["completion"], load)
        evaluation = self.eval_dataset
        datasets = [self.train_dataset]
        if evaluation is not None:
            datasets += list(evaluation.values()) if isinstance(evaluation, dict) else [evaluation]
        if not self.prompt_only:
            check_cached_rows(self.teacher_source, datasets, {"completion": "completion_ids"})
        self.signals_collator = SignalsCollator(
            self.data_collator,
            {"teacher_": self.teacher_source},
            lambda examples: [(str(e["id"]), "completion") for e in examples],
            lambda n: slice(None),
            routing_column=args.teacher_routing_column,
        )
        if not self.prompt_only:  # prompt-only batches get their signals on the samples, in compute_loss
            self.data_collator = self.signals_collator

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["id", "prompt", "prompt_ids", "completion_ids"]
            if self.args.teacher_routing_column:
                self._signature_columns.append(self.args.teacher_routing_column)

    # -- on-policy samples ------------------------------------------------------------------------------------------
    def _student_samples(self, model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch with its completions replaced by the current student's samples for the same prompts."""
        args = self.args
        prompts = inputs["prompt"]
        params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_completion_length)
        seeds = rollout_seeds(args.seed, self._samples, self.accelerator.process_index, len(prompts))
        self._samples += 1
        if self.rollouts is not None:
            zero3 = zero3_enabled(self.accelerator, self.is_deepspeed_enabled)
            completions = self.rollouts.sample(
                prompts, params, seeds, model=self.model, step=self.state.global_step, zero3=zero3
            )
        else:
            completions = self._in_place_samples(model, prompts, params, seeds)
        prompt_ids = encode_prompts(self._tokenizer, prompts)
        batch = self.kd_collator.build(list(zip(prompt_ids, completions)))
        device = self.accelerator.device
        return {**inputs, **{key: value.to(device) for key, value in batch.items()}}

    def _in_place_samples(
        self, model: Any, prompts: list[Any], params: SamplingParams, seeds: list[int]
    ) -> list[list[int]]:
        """`rollout_backend=student`: sample with the live student itself (token ids, one completion per prompt)."""
        with unwrap_model_for_generation(
            model, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as unwrapped:
            was_training = unwrapped.training
            # a PEFT student generates through its base model, whose layers carry the adapters
            student = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            try:
                generator = TransformersGenerator(student, self._tokenizer, batch_size=len(prompts))
                completions = generate_with_seeds(generator, prompts, params, seeds)
            finally:
                unwrapped.train(was_training)
        return [list(c[0].token_ids) for c in completions]

    def _on_policy(self) -> bool:
        """Whether this batch trains on student samples: always for prompt-only data, else with probability λ."""
        if self.prompt_only:
            return True
        return self.model.training and self.args.lmbda > 0 and self._draws.random() < self.args.lmbda

    # -- loss -------------------------------------------------------------------------------------------------------
    def _scores(self, model: Any, inputs: dict[str, Any], need_logits: bool) -> tuple[ResponseScores, Any]:
        """The student's loss terms over the response view (fused unless `fused_lm_head` is off, a head is not
        plain, or the logits are asked for) and its outputs (None on the fused path)."""
        args = self.args
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        labels, mask = inputs["input_ids"][:, 1:], inputs["completion_mask"][:, 1:].bool()
        view = {"labels": labels, "mask": mask, "reduction": args.loss_reduction}
        if not need_logits and self._fused_ready(model, self.teacher):
            return ResponseScores(**view, student=self._fused_hidden(model, forward, self.vocab_size)), None
        outputs = model(**forward, use_cache=False)
        logits = slice_logits_to_vocab(outputs.logits, self.vocab_size)[:, :-1]
        return ResponseScores(**view, chunk_size=args.loss_chunk_size, logits=logits), outputs

    def _divergence(self, scores: ResponseScores, inputs: dict[str, Any], t: float | None):
        """`kd_loss` against the live teacher (its logits, or its hidden states and head on the fused path), or
        `topk_kd_loss` against the cached / served top-k (τ = 1)."""
        args = self.args
        params: dict[str, Any] = {"divergence": args.divergence, **args.divergence_params()}
        if t is not None:
            params["taid_t"] = t
        rows = slice(None)
        if self.teacher is None:
            return scores.topk_kd(rows, inputs["teacher_ids"], inputs["teacher_logprobs"], **params)
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if scores.student is not None:
            with torch.no_grad():
                teacher = self._fused_hidden(self.teacher, forward, self.vocab_size)
        else:
            teacher = response_view(
                slice_logits_to_vocab(frozen_logits(self.teacher, **forward), self.vocab_size),
                inputs["input_ids"],
                inputs["completion_mask"],
            )[0]
        return scores.kd(rows, teacher, temperature=args.temperature, **params)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        on_policy = self._on_policy()
        if on_policy:
            inputs = self._student_samples(model, inputs)
            if self.teacher is None:  # a served teacher scores the samples (a cache cannot: the config says so)
                keys = [("", "completion")] * inputs["input_ids"].shape[0]
                routes = inputs.get("teacher_routes")
                inputs = self.signals_collator.add_signals(dict(inputs), keys, slice(None), routes)
        scores, outputs = self._scores(model, inputs, need_logits=return_outputs)
        mask = scores.mask
        t = self.taid.t if self.taid is not None else None
        divergence = self._divergence(scores, inputs, t)
        parts = {"kd/loss": divergence}
        loss = divergence
        if args.sft_weight > 0:
            parts["kd/sft"] = scores.nll(slice(None))
            loss = loss + args.sft_weight * parts["kd/sft"]
        training = self.model.training
        parts["kd/completion_tokens"] = mask.sum(-1).float().mean()
        if training:
            parts["kd/on_policy_fraction"] = torch.tensor(float(on_policy), device=scores.device)
        if t is not None:
            parts["taid/t"] = torch.tensor(t, device=scores.device)
        recorded = record_metrics(self, parts)
        if t is not None and training:
            self.taid.update(recorded["kd/loss"], self.state.global_step, self.state.max_steps)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.rollouts is not None:
                self.rollouts.close()  # free the engine (another may need the memory); rebuilt if sampled again

    # -- TAID state in checkpoints ----------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.taid is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            (folder / TAID_STATE).write_text(json.dumps(asdict(self.taid)) + "\n")

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        state = Path(checkpoint) / TAID_STATE if checkpoint else None
        if self.taid is not None and state is not None and state.is_file():
            self.taid = TAIDSchedule(**json.loads(state.read_text()))
