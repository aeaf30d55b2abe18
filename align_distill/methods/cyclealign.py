"""`align-distill train cyclealign`: iterative distillation from a black-box ranker (docs/methods/cyclealign.md).

Each cycle samples N responses per prompt from the white box, ranks them with the black box (an LLM judge with
static + dynamic demonstrations, or the noisy oracle) and with the white box's own likelihood, keeps their
agreement as new demonstrations, and trains the white box with PRO + SFT. Rerunning with the same `output_dir`
resumes at the cycle and step where it stopped. `use_peft` trains a LoRA adapter (ModelConfig's `lora_*` fields):
the white box samples and ranks with the adapter applied, and `output_dir` holds the adapter.
"""

from __future__ import annotations

from trl import ModelConfig

from align_distill.models import load_model, load_tokenizer
from align_distill.trainers.cyclealign import CycleAlign, CycleAlignConfig

from .common import DataArguments, load_method_dataset, peft_config_from, require_dataset

HELP = "CycleAlign: cycles of white-box sampling, black-box ranking with in-context demonstrations, PRO training"
DATA_FORMAT = "prompt"

DATACLASSES = (DataArguments, CycleAlignConfig, ModelConfig)


def main(data_args: DataArguments, training_args: CycleAlignConfig, model_args: ModelConfig) -> dict:

    require_dataset(data_args, "cyclealign")
    if not training_args.black_box:
        raise SystemExit("align-distill train cyclealign: set `black_box` (kind: llm | noisy_oracle | ...)")
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code, what="model"
    )
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
