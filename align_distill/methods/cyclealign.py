"""`align-distill train cyclealign`: iterative distillation from a black-box ranker (specs/cyclealign.md).

Each cycle samples N responses per prompt from the white box, ranks them with the black box (an LLM judge with
static + dynamic demonstrations, or the noisy oracle) and with the white box's own likelihood, keeps their
agreement as new demonstrations, and trains the white box with PRO + SFT. Rerunning with the same `output_dir`
resumes at the cycle and step where it stopped. `use_peft` trains a LoRA adapter (ModelConfig's `lora_*` fields):
the white box samples and ranks with the adapter applied, and `output_dir` holds the adapter.
"""

from __future__ import annotations

from trl import ModelConfig

from align_distill.pipeline import Stage
from align_distill.trainers.cyclealign import CycleAlignConfig

from .common import DataArguments, load_method_dataset, peft_config_from, require_dataset

HELP = "CycleAlign: cycles of white-box sampling, black-box ranking with in-context demonstrations, PRO training"
DATA_FORMAT = "prompt"

DATACLASSES = (DataArguments, CycleAlignConfig, ModelConfig)


def main(data_args: DataArguments, training_args: CycleAlignConfig, model_args: ModelConfig) -> dict:
    from align_distill.models import load_model, load_tokenizer
    from align_distill.trainers.cyclealign import CycleAlign

    require_dataset(data_args, "cyclealign")
    if not training_args.black_box:
        raise SystemExit("align-distill train cyclealign: set `black_box` (kind: llm | noisy_oracle | ...)")
    tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code)
    columns = ("id", "prompt", "chosen", "rejected") if training_args.dataset_responses else ("id", "prompt")
    prompts, _ = load_method_dataset(data_args, DATA_FORMAT, tokenizer, None, columns)
    dtype = model_args.dtype or "auto"

    def loader(path: str):
        return load_model(path, dtype=dtype, trust_remote_code=training_args.trust_remote_code)

    loop = CycleAlign(
        loader(model_args.model_name_or_path),
        tokenizer,
        training_args,
        prompts,
        model_loader=loader,
        peft_config=peft_config_from(model_args),
    )
    history = loop.run()
    loop.save(training_args.output_dir)  # the last cycle's model (or adapter) and tokenizer
    metrics: dict = {}
    for cycle in history:
        metrics.update({f"cycle_{cycle['cycle']}/{k}": v for k, v in cycle.items() if k != "cycle"})
    return metrics


def quickstart_stages(seed: int) -> list[Stage]:
    """The quickstart's CycleAlign student: from the SFT student, 3 cycles against a noisy oracle (the synthetic
    task's ground-truth reward + Gaussian noise, 5 % unparsable answers) standing in for an imperfect LLM judge.

    The candidates are the white box's samples plus each prompt's chosen/rejected pair from the data (spec §9.7's
    option): the tiny SFT student answers with one style marker per prompt almost deterministically, so its own
    samples alone give the black box nothing to prefer (measured: see docs/cyclealign.md)."""
    from align_distill.quickstart import COMMON

    config = {
        **COMMON,
        "model_name_or_path": "${student_sft}",
        "dataset_path": "${data}/pairs.jsonl",
        "dataset_responses": True,
        "cycles": 3,
        "prompts_per_cycle": 128,
        "num_responses": 4,
        "oversample": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 24,
        "generation_batch_size": 128,
        "black_box": {
            "kind": "noisy_oracle",
            "function": "align_distill.synthetic:reward",
            "noise": 0.3,
            "failure_rate": 0.05,
            "seed": seed,
        },
        "reward_function": "align_distill.synthetic:reward",
        "num_train_epochs": 2,
        "learning_rate": 1e-4,
        "sft_beta": 0.05,
        "per_device_train_batch_size": 16,
        "logging_steps": 4,
        "seed": seed,
    }
    return [Stage("cyclealign", "train", "cyclealign", config)]
