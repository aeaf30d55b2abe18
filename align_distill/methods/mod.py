"""`align-distill train mod`: LLaVA-MoD (docs/methods/llava_mod.md), one method with a `stage` field.

    stage: d2d   mimic, dense → dense: KL(teacher ‖ student), whole LM + projector trained     (completion data)
    stage: d2s   upcycle the dense student to a sparse MoE (unless it is one), then mimic with
                 KD + CE + 0.01·ℓ_aux, only FFN / experts / routers + projector trained      (completion data)
    stage: pd    preference distillation: DPO (or KTO-pair) with the teacher as the reference (preference data)

Each stage reads `model_name_or_path` (the previous stage's output) and `teacher_model_name_or_path` (the frozen
dense teacher), so a pipeline chains d2d → d2s → pd. Text models and LLaVA-style vision-language models alike: a
model folder whose config has a `vision_config` is loaded with its processor, and the data is read with
`align_distill.synthetic.visual.load_visual_dataset` (rows with `image`/`images` paths).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    TrainingArguments,
)
from trl import ModelConfig

from align_distill.data_gen import load_signals
from align_distill.errors import ConfigError
from align_distill.models import check_tokenizer_compatibility, load_model, load_tokenizer
from align_distill.models.moe import moe_parameter_counts, parameter_numel, upcycle_to_moe
from align_distill.synthetic.visual import load_visual_dataset
from align_distill.teachers.server import ServerTeacher
from align_distill.trainers.common import default_precision
from align_distill.trainers.mod_mimic import MoDMimicConfig, MoDMimicTrainer, moe_routers
from align_distill.trainers.mod_preference import (
    MoDPreferenceConfig,
    MoDPreferenceTrainer,
    teacher_logps_from_signals,
    teacher_logps_from_source,
)
from align_distill.vocabulary import reject_ignored_fields

from .common import (
    DataArguments,
    load_method_dataset,
    peft_config_from,
    require_dataset,
    save_final,
)

logger = logging.getLogger(__name__)

HELP = "LLaVA-MoD: mimic distillation (d2d, upcycle + d2s) and preference distillation with the teacher as reference"
# completion data for the mimic stages, preference data for `pd`: validated per stage in `main`, not up front
DATA_FORMAT = None
STAGE_FORMATS = {"d2d": "completion", "d2s": "completion", "pd": "preference"}


@dataclass
class MoDArguments:
    """What the LLaVA-MoD stage is and where its teacher and MoE settings come from.

    Parameters:
        stage (`str`, defaults to `"d2d"`):
            `d2d`, `d2s` or `pd` (see the module docstring).
        teacher_model_name_or_path (`str`, *optional*):
            The frozen dense teacher (same tokenizer/processor as the student). Optional only with a signal cache.
        signals_path (`str`, *optional*):
            A `signals` store (`align-distill generate signals`) on this data: top-k teacher log-probs for d2d/d2s
            (`topk_kd_loss`), summed teacher log-probs for pd. Used when no teacher model is given.
        teacher_name (`str`, *optional*):
            Which teacher of the signal cache to use; `None` = its first teacher.
        teacher_server_url (`str`, *optional*), teacher_server_model (`str`, *optional*),
        teacher_server_kwargs (`dict`, *optional*), signals_top_k (`int`, defaults to `50`):
            A text teacher served by vLLM (docs/teachers.md), used when no teacher model is given: its top-k
            log-probs of every batch for d2d/d2s (`topk_kd_loss`), its summed response log-probs for pd (one pass
            over the data before training). Base URL, served model name, client settings, ids per position.
        num_experts (`int`, defaults to `4`), num_experts_per_tok (`int`, defaults to `2`),
        moe_every (`int`, defaults to `2`):
            Upcycling in `d2s`: E experts, top-k routing, MoE on layers 0, every, 2·every, …
        upcycle_seed (`int`, defaults to `0`):
            Seed of the routers' initialisation.

    Deprecated keys (one release): `teacher_signals_path` → `signals_path`, `signals_teacher` → `teacher_name`,
    `top_k` → `num_experts_per_tok`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {
        "teacher_signals_path": "signals_path",
        "signals_teacher": "teacher_name",
        "top_k": "num_experts_per_tok",
    }

    stage: str = field(default="d2d", metadata={"help": "d2d | d2s | pd.", "choices": ["d2d", "d2s", "pd"]})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The frozen dense teacher."})
    signals_path: str | None = field(
        default=None, metadata={"help": "Teacher-signal cache (used when no teacher model is given)."}
    )
    teacher_name: str | None = field(
        default=None, metadata={"help": "Teacher name in the signal cache (None: its first teacher)."}
    )
    teacher_server_url: str | None = field(
        default=None, metadata={"help": "A text teacher's vLLM server (used when no teacher model is given)."}
    )
    teacher_server_model: str | None = field(default=None, metadata={"help": "Its served model name."})
    teacher_server_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Client settings (api_key_env, max_concurrency, timeout, max_retries, ...)."}
    )
    signals_top_k: int = field(default=50, metadata={"help": "Served teacher: ids per position (d2d/d2s)."})
    num_experts: int = field(default=4, metadata={"help": "Experts per MoE layer (d2s upcycling)."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Experts per token (d2s upcycling)."})
    moe_every: int = field(default=2, metadata={"help": "MoE on every n-th decoder layer from 0 (d2s upcycling)."})
    upcycle_seed: int = field(default=0, metadata={"help": "Router initialisation seed (d2s upcycling)."})

    def __post_init__(self) -> None:
        if self.stage not in STAGE_FORMATS:
            raise ValueError(f"stage must be one of {sorted(STAGE_FORMATS)}, got {self.stage!r}")


@dataclass
class MoDTrainingConfig(TrainingArguments):
    """Training arguments of every LLaVA-MoD stage (`transformers.TrainingArguments` plus the fields below); the
    stage's own config (`MoDMimicConfig` for d2d/d2s, `MoDPreferenceConfig` for pd) is built from it.

    > Data

    max_length (`int`, defaults to `1024`): tokens per sequence (prompt + response, image tokens included).

    > Mimic stages (d2d, d2s)

    kd_weight (`float`, defaults to `1.0`), sft_weight (`float`, *optional*: 0 for d2d, 1 for d2s),
    loss_chunk_size (`int`, *optional*), loss_mode (`str`, defaults to `"paper"`): see `MoDMimicConfig`.

    > Preference stage (pd)

    beta (`float`, defaults to `0.1`), loss_type (`str`, defaults to `"sigmoid"`; or `kto_pair`),
    precompute_ref_log_probs (`bool`, defaults to `False`: score the data with the teacher once, then free it),
    trainable (`str`, defaults to `"auto"`): see `MoDPreferenceConfig`.

    > Both

    aux_loss_weight (`float`, defaults to `0.01`), balancing_convention (`str`, defaults to `"deepspeed"`).

    Changed defaults from `TrainingArguments`: learning_rate 2e-5 (the method page's mimic rate; set 2e-6 for pd),
    `bf16=None` (bf16 only on a CUDA device that supports it), `lr_scheduler_type="cosine"`, `warmup_ratio=0.03`,
    `remove_unused_columns=False`, `report_to="none"`.

    A stage's fields set in another stage (e.g. `beta` in d2d, `kd_weight` in pd) are rejected, as is
    `label_smoothing_factor` (every stage computes its own loss). Deprecated keys (one release): `kd_coef` →
    `kd_weight`, `ce_coef` → `sft_weight`, `aux_loss_coef` → `aux_loss_weight`, `kd_chunk_size` → `loss_chunk_size`,
    `topk_mode` → `loss_mode` (same values, paper | official).
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {
        "kd_coef": "kd_weight",
        "ce_coef": "sft_weight",
        "aux_loss_coef": "aux_loss_weight",
        "kd_chunk_size": "loss_chunk_size",
        "topk_mode": "loss_mode",
    }
    ignored_fields: ClassVar[dict[str, str]] = {
        "label_smoothing_factor": "every stage computes its own loss, without the Trainer's label smoother",
    }
    method_label: ClassVar[str] = "LLaVA-MoD"
    # the fields below that only one kind of stage reads
    mimic_fields: ClassVar[tuple[str, ...]] = ("kd_weight", "sft_weight", "loss_chunk_size", "loss_mode")
    preference_fields: ClassVar[tuple[str, ...]] = ("beta", "loss_type", "precompute_ref_log_probs", "trainable")

    max_length: int | None = field(default=1024, metadata={"help": "Maximum tokens per sequence."})
    kd_weight: float = field(default=1.0, metadata={"help": "Mimic: weight of KL(teacher ‖ student)."})
    sft_weight: float | None = field(default=None, metadata={"help": "Mimic: weight of the CE (None: 0 d2d, 1 d2s)."})
    loss_chunk_size: int | None = field(default=None, metadata={"help": "Mimic: positions per chunk of the KL."})
    loss_mode: str = field(
        default="paper", metadata={"help": "Mimic from a cache: paper | official.", "choices": ["paper", "official"]}
    )
    beta: float = field(default=0.1, metadata={"help": "pd: β of the preference loss."})
    loss_type: str = field(
        default="sigmoid", metadata={"help": "pd: sigmoid (DPO) | kto_pair.", "choices": ["sigmoid", "kto_pair"]}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "pd: score the data with the teacher before training, then free it."}
    )
    trainable: str = field(
        default="auto", metadata={"help": "pd: trainable set auto | d2s | all.", "choices": ["auto", "d2s", "all"]}
    )
    aux_loss_weight: float = field(default=0.01, metadata={"help": "Weight of the MoE load-balancing loss."})
    balancing_convention: str = field(
        default="deepspeed",
        metadata={"help": "deepspeed (method doc) | transformers.", "choices": ["deepspeed", "transformers"]},
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate (paper: 2e-5 mimic, 2e-6 pd)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 (None: only on a CUDA device that supports it)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Warm-up fraction of the steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the data's columns (ids, images)."})
    report_to: str | None = field(default="none", metadata={"help": "Loggers to report to (none, tensorboard, ...)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})

    def __post_init__(self) -> None:
        default_precision(self)
        reject_ignored_fields(self)  # the values as given, before TRL resolves them
        super().__post_init__()

    def stage_config(self, stage: str) -> Any:
        """The trainer config of `stage`: every `TrainingArguments` field plus the fields that stage knows. A field
        of the other kind of stage set to a non-default value is a `ConfigError`."""

        other = self.mimic_fields if stage == "pd" else self.preference_fields
        defaults = {f.name: f.default for f in dataclasses.fields(type(self)) if f.name in other}
        unused = [name for name in other if getattr(self, name) != defaults[name]]
        if unused:
            kind = "the mimic stages (d2d, d2s)" if stage == "pd" else "the preference stage (pd)"
            raise ConfigError(
                f"MoDTrainingConfig: {', '.join(f'`{n}`' for n in unused)} only "
                f"{'acts' if len(unused) == 1 else 'act'} in {kind}, not in stage {stage}; remove "
                f"{'it' if len(unused) == 1 else 'them'}"
            )
        target = MoDPreferenceConfig if stage == "pd" else MoDMimicConfig
        known = {f.name for f in dataclasses.fields(target) if f.init}
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and f.name in known and f.name not in ("loss_type", "stage")
        }
        if stage == "pd":
            values["loss_type"] = [self.loss_type]
        else:
            values["stage"] = stage
        # TrainingArguments.__post_init__ turns some fields into objects; hand back what it accepts as input
        values["lr_scheduler_type"] = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        values["deepspeed"] = self.deepspeed
        return target(**values)


DATACLASSES = (DataArguments, MoDArguments, MoDTrainingConfig, ModelConfig)


def is_vision_model(path: str) -> bool:

    return hasattr(AutoConfig.from_pretrained(path), "vision_config")


def _load(path: str, dtype: str, vision: bool, frozen: bool = False, trust_remote_code: bool = False):

    model_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    return load_model(path, dtype=dtype, frozen=frozen, model_class=model_class, trust_remote_code=trust_remote_code)


def _datasets(data_args: DataArguments, stage: str, processing: Any, vision: bool, max_length: int | None):
    fmt = STAGE_FORMATS[stage]
    if vision:
        if data_args.dataset_train_split != "train" or data_args.dataset_test_split:
            raise ConfigError("align-distill train mod: vision data is read from files (no dataset splits)")
        train = load_visual_dataset(data_args.dataset_name, fmt)
        evaluation = load_visual_dataset(data_args.eval_dataset_path, fmt) if data_args.eval_dataset_path else None
        return train, evaluation
    columns = ("id", "prompt", "completion") if fmt == "completion" else ("id", "prompt", "chosen", "rejected")
    return load_method_dataset(data_args, fmt, processing, max_length, columns)


def build_trainer(
    data_args: DataArguments, mod_args: MoDArguments, training_args: MoDTrainingConfig, model_args: ModelConfig
):
    """Load student, teacher (or signals) and data for `mod_args.stage` and return the ready trainer."""

    stage = mod_args.stage
    require_dataset(data_args, f"mod (stage {stage})")
    peft_config = peft_config_from(model_args)
    if peft_config is not None and stage != "pd":
        raise SystemExit(
            f"align-distill train mod: use_peft (LoRA) is supported in stage pd only, found stage {stage}: the mimic "
            "stages' trainable sets are the method (d2d: the whole language model and projector; d2s: the experts "
            "that upcycling creates, routers and projector, which must be saved in full). Train d2d/d2s in full and "
            "use LoRA for the preference stage."
        )
    if not (mod_args.teacher_model_name_or_path or mod_args.signals_path or mod_args.teacher_server_url):
        raise SystemExit(
            "align-distill train mod: set teacher_model_name_or_path, signals_path or teacher_server_url"
        )
    student_path = model_args.model_name_or_path
    vision = is_vision_model(student_path)
    trust = training_args.trust_remote_code
    if vision:
        processing = AutoProcessor.from_pretrained(student_path)
    else:
        processing = load_tokenizer(student_path, trust_remote_code=trust)
    train, evaluation = _datasets(data_args, stage, processing, vision, training_args.max_length)

    dtype = model_args.dtype or "auto"
    student = _load(student_path, dtype, vision, trust_remote_code=trust)
    if stage == "d2s" and not moe_routers(student):
        student = upcycle_to_moe(
            student,
            num_experts=mod_args.num_experts,
            top_k=mod_args.num_experts_per_tok,
            every=mod_args.moe_every,
            router_aux_loss_coef=training_args.aux_loss_weight,
            seed=mod_args.upcycle_seed,
        )
        logger.info("upcycled the dense student: %s", moe_parameter_counts(student))
    teacher = None
    if mod_args.teacher_model_name_or_path:
        teacher = _load(mod_args.teacher_model_name_or_path, dtype, vision, frozen=True, trust_remote_code=trust)
        if not vision:
            check_tokenizer_compatibility(
                processing, load_tokenizer(mod_args.teacher_model_name_or_path, trust_remote_code=trust)
            )

    source = None
    if teacher is None and mod_args.teacher_server_url:
        if vision:
            raise SystemExit("align-distill train mod: a served teacher is text only; load the vision teacher")
        kwargs = mod_args.teacher_server_kwargs
        source = ServerTeacher(
            mod_args.teacher_server_url,
            processing,
            mod_args.signals_top_k,
            model=mod_args.teacher_server_model,
            client_kwargs=json.loads(kwargs) if isinstance(kwargs, str) else kwargs,
        )
    config = training_args.stage_config(stage)
    if stage != "pd":
        config.teacher_name = mod_args.teacher_name
    common = {"args": config, "train_dataset": train, "eval_dataset": evaluation, "processing_class": processing}
    if stage == "pd":
        if source is not None:
            common["train_dataset"] = teacher_logps_from_source(train, source, processing)
            if evaluation is not None:
                common["eval_dataset"] = teacher_logps_from_source(evaluation, source, processing)
        elif teacher is None:
            signals = load_signals(mod_args.signals_path)
            common["train_dataset"] = teacher_logps_from_signals(train, signals, mod_args.teacher_name)
            if evaluation is not None:
                common["eval_dataset"] = teacher_logps_from_signals(evaluation, signals, mod_args.teacher_name)
        return MoDPreferenceTrainer(model=student, teacher_model=teacher, peft_config=peft_config, **common)
    signals = None
    if teacher is None and source is None:
        signals = load_signals(mod_args.signals_path)
    return MoDMimicTrainer(
        model=student, teacher_model=teacher, teacher_signals=signals, teacher_source=source, **common
    )


def main(
    data_args: DataArguments, mod_args: MoDArguments, training_args: MoDTrainingConfig, model_args: ModelConfig
) -> dict:

    trainer = build_trainer(data_args, mod_args, training_args, model_args)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_final(trainer, trainer.processing_class, training_args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    counts = moe_parameter_counts(model)
    metrics = dict(result.metrics)
    metrics.update(
        stage=mod_args.stage,
        total_parameters=counts["total"],
        activated_parameters=counts["activated"],
        trainable_parameters=sum(parameter_numel(p) for p in model.parameters() if p.requires_grad),
    )
    return metrics
