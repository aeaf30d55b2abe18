"""`align-distill train mod`: LLaVA-MoD (specs/llava_mod.md), one method with a `stage` field.

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
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from trl import ModelConfig

from .common import (
    DataArguments,
    default_precision,
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
        teacher_signals_path (`str`, *optional*):
            A `signals` store (`align-distill generate signals`) on this data: top-k teacher log-probs for d2d/d2s
            (`topk_kd_loss`), summed teacher log-probs for pd. Used when no teacher model is given.
        num_experts (`int`, defaults to `4`), top_k (`int`, defaults to `2`), moe_every (`int`, defaults to `2`):
            Upcycling in `d2s`: E experts, top-k routing, MoE on layers 0, every, 2·every, …
        upcycle_seed (`int`, defaults to `0`):
            Seed of the routers' initialisation.
    """

    stage: str = field(default="d2d", metadata={"help": "d2d | d2s | pd.", "choices": ["d2d", "d2s", "pd"]})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The frozen dense teacher."})
    teacher_signals_path: str | None = field(
        default=None, metadata={"help": "Teacher-signal cache (used when no teacher model is given)."}
    )
    num_experts: int = field(default=4, metadata={"help": "Experts per MoE layer (d2s upcycling)."})
    top_k: int = field(default=2, metadata={"help": "Experts per token (d2s upcycling)."})
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

    kd_coef (`float`, defaults to `1.0`), ce_coef (`float`, *optional*: 0 for d2d, 1 for d2s),
    kd_chunk_size (`int`, *optional*), topk_mode (`str`, defaults to `"paper"`): see `MoDMimicConfig`.

    > Preference stage (pd)

    beta (`float`, defaults to `0.1`), loss_type (`str`, defaults to `"sigmoid"`; or `kto_pair`),
    precompute_ref_log_probs (`bool`, defaults to `False`: score the data with the teacher once, then free it),
    trainable (`str`, defaults to `"auto"`): see `MoDPreferenceConfig`.

    > Both

    aux_loss_coef (`float`, defaults to `0.01`), balancing_convention (`str`, defaults to `"deepspeed"`).

    Changed defaults from `TrainingArguments`: learning_rate 2e-5 (the spec's mimic rate; set 2e-6 for pd),
    `bf16=None` (bf16 only on a CUDA device that supports it), `lr_scheduler_type="cosine"`, `warmup_ratio=0.03`,
    `remove_unused_columns=False`, `report_to="none"`.
    """

    max_length: int | None = field(default=1024, metadata={"help": "Maximum tokens per sequence."})
    kd_coef: float = field(default=1.0, metadata={"help": "Mimic: weight of KL(teacher ‖ student)."})
    ce_coef: float | None = field(default=None, metadata={"help": "Mimic: weight of the CE (None: 0 d2d, 1 d2s)."})
    kd_chunk_size: int | None = field(default=None, metadata={"help": "Mimic: positions per chunk of the KL."})
    topk_mode: str = field(
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
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the MoE load-balancing loss."})
    balancing_convention: str = field(
        default="deepspeed",
        metadata={"help": "deepspeed (spec) | transformers.", "choices": ["deepspeed", "transformers"]},
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial learning rate (spec: 2e-5 mimic, 2e-6 pd)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 (None: only on a CUDA device that supports it)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Warm-up fraction of the steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the data's columns (ids, images)."})
    report_to: str | None = field(default="none", metadata={"help": "Loggers to report to (none, tensorboard, ...)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})

    def __post_init__(self) -> None:
        default_precision(self)
        super().__post_init__()

    def stage_config(self, stage: str) -> Any:
        """The trainer config of `stage`: every `TrainingArguments` field plus the fields that stage knows."""
        from align_distill.trainers.mod_mimic import MoDMimicConfig
        from align_distill.trainers.mod_preference import MoDPreferenceConfig

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
    from transformers import AutoConfig

    return hasattr(AutoConfig.from_pretrained(path), "vision_config")


def _load(path: str, dtype: str, vision: bool, frozen: bool = False, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from align_distill.models import load_model

    model_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    return load_model(path, dtype=dtype, frozen=frozen, model_class=model_class, trust_remote_code=trust_remote_code)


def _datasets(data_args: DataArguments, stage: str, processing: Any, vision: bool, max_length: int | None):
    fmt = STAGE_FORMATS[stage]
    if vision:
        from align_distill.synthetic.visual import load_visual_dataset

        train = load_visual_dataset(data_args.dataset_path, fmt)
        evaluation = load_visual_dataset(data_args.eval_dataset_path, fmt) if data_args.eval_dataset_path else None
        return train, evaluation
    columns = ("id", "prompt", "completion") if fmt == "completion" else ("id", "prompt", "chosen", "rejected")
    return load_method_dataset(data_args, fmt, processing, max_length, columns)


def build_trainer(
    data_args: DataArguments, mod_args: MoDArguments, training_args: MoDTrainingConfig, model_args: ModelConfig
):
    """Load student, teacher (or signals) and data for `mod_args.stage` and return the ready trainer."""
    from align_distill.models import load_tokenizer
    from align_distill.models.moe import moe_parameter_counts, upcycle_to_moe
    from align_distill.trainers.mod_mimic import MoDMimicTrainer, moe_routers
    from align_distill.trainers.mod_preference import MoDPreferenceTrainer, teacher_logps_from_signals

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
    if not mod_args.teacher_model_name_or_path and not mod_args.teacher_signals_path:
        raise SystemExit("align-distill train mod: set teacher_model_name_or_path or teacher_signals_path")
    student_path = model_args.model_name_or_path
    vision = is_vision_model(student_path)
    trust = training_args.trust_remote_code
    if vision:
        from transformers import AutoProcessor

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
            top_k=mod_args.top_k,
            every=mod_args.moe_every,
            router_aux_loss_coef=training_args.aux_loss_coef,
            seed=mod_args.upcycle_seed,
        )
        logger.info("upcycled the dense student: %s", moe_parameter_counts(student))
    teacher = None
    if mod_args.teacher_model_name_or_path:
        teacher = _load(mod_args.teacher_model_name_or_path, dtype, vision, frozen=True, trust_remote_code=trust)
        if not vision:
            from align_distill.models import check_tokenizer_compatibility

            check_tokenizer_compatibility(
                processing, load_tokenizer(mod_args.teacher_model_name_or_path, trust_remote_code=trust)
            )

    config = training_args.stage_config(stage)
    common = {"args": config, "train_dataset": train, "eval_dataset": evaluation, "processing_class": processing}
    if stage == "pd":
        if teacher is None:
            from align_distill.data_gen import load_signals

            signals = load_signals(mod_args.teacher_signals_path)
            common["train_dataset"] = teacher_logps_from_signals(train, signals)
            if evaluation is not None:
                common["eval_dataset"] = teacher_logps_from_signals(evaluation, signals)
        return MoDPreferenceTrainer(model=student, teacher_model=teacher, peft_config=peft_config, **common)
    signals = None
    if teacher is None:
        from align_distill.data_gen import load_signals

        signals = load_signals(mod_args.teacher_signals_path)
    return MoDMimicTrainer(model=student, teacher_model=teacher, teacher_signals=signals, **common)


def main(
    data_args: DataArguments, mod_args: MoDArguments, training_args: MoDTrainingConfig, model_args: ModelConfig
) -> dict:
    from align_distill.models.moe import moe_parameter_counts, parameter_numel

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


# ---------------------------------------------------------------- quickstart


def quickstart_stages(seed: int) -> list:
    """LLaVA-MoD on the text task: d2d from `${student_sft}` with teacher `${teacher_dpo}`, upcycle + d2s, then pd
    with `${teacher_dpo}` as the reference on the preference pairs. The last stage is the student to evaluate."""
    from align_distill.pipeline import Stage
    from align_distill.quickstart import COMMON

    teacher = "${teacher_dpo}"
    mimic = {"dataset_path": "${data}/sft.jsonl", "teacher_model_name_or_path": teacher, "seed": seed}
    return [
        Stage(
            "mod_d2d",
            "train",
            "mod",
            {
                **COMMON,
                **mimic,
                "stage": "d2d",
                "model_name_or_path": "${student_sft}",
                "max_steps": 40,
                "learning_rate": 1e-3,
            },
        ),
        Stage(
            "mod_d2s",
            "train",
            "mod",
            {
                **COMMON,
                **mimic,
                "stage": "d2s",
                "model_name_or_path": "${mod_d2d}",
                "max_steps": 40,
                "learning_rate": 1e-3,
            },
        ),
        Stage(
            "mod_pd",
            "train",
            "mod",
            {
                **COMMON,
                "stage": "pd",
                "model_name_or_path": "${mod_d2s}",
                "teacher_model_name_or_path": teacher,
                "dataset_path": "${data}/pairs.jsonl",
                "max_steps": 60,
                "learning_rate": 5e-5,
                "beta": 0.1,
                "precompute_ref_log_probs": True,
                "seed": seed,
            },
        ),
    ]


# ---------------------------------------- the tiny vision example (configs/mod_vision_tiny.yaml)
# `call` stages that prepare the LLaVA teacher (TRL's own SFT / DPO trainers on the coloured-shapes task, which TRL
# supports for vision-language models) and score models with `evaluate_visual`.

_VISION_DEFAULTS: dict[str, Any] = {
    "bf16": False,
    "report_to": "none",
    "save_strategy": "no",
    "max_length": 128,
    "dataloader_pin_memory": False,
    "remove_unused_columns": False,
}


def vision_sft(out: str, model_name_or_path: str, dataset_path: str, **training: Any) -> dict:
    """TRL SFT of a LLaVA folder on vision prompt/completion data (JSONL + images); saves model + processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from align_distill.synthetic.visual import load_visual_dataset

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model_name_or_path),
        args=SFTConfig(output_dir=str(out), **{**_VISION_DEFAULTS, **training}),
        train_dataset=load_visual_dataset(dataset_path, "completion"),
        processing_class=processor,
    )
    result = trainer.train()
    save_final(trainer, processor, str(out))
    return dict(result.metrics)


def vision_dpo(out: str, model_name_or_path: str, dataset_path: str, **training: Any) -> dict:
    """TRL DPO (the model's own initialisation as reference) of a LLaVA folder on vision preference data."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from align_distill.synthetic.visual import load_visual_dataset

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    trainer = DPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model_name_or_path),
        ref_model=AutoModelForImageTextToText.from_pretrained(model_name_or_path),
        args=DPOConfig(output_dir=str(out), **{**_VISION_DEFAULTS, **training}),
        train_dataset=load_visual_dataset(dataset_path, "preference"),
        processing_class=processor,
    )
    result = trainer.train()
    save_final(trainer, processor, str(out))
    return dict(result.metrics)


def evaluate_vision(out: str, models: dict[str, str], n: int = 200, seed: int = 10_000) -> dict[str, dict]:
    """Greedy coloured-shapes reward of every model (LLaVA folders); prints a table and writes `eval.json`."""
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from align_distill.synthetic.visual import evaluate_visual

    results = {}
    for name, path in models.items():
        model = AutoModelForImageTextToText.from_pretrained(path)
        results[name] = evaluate_visual(model, AutoProcessor.from_pretrained(path), n=n, seed=seed).as_dict()
        row = results[name]
        print(
            f"  {name:16s} reward {row['reward']:.3f}  capability {row['capability']:.3f}  "
            f"preference {row['preference']:.3f}",
            flush=True,
        )
    (Path(out) / "eval.json").write_text(json.dumps(results, indent=2))
    return results
