"""`CycleAlignConfig`: the settings of the CycleAlign loop and of its PRO training step
(docs/methods/cyclealign.md)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

from align_distill.trainers.common import default_precision
from align_distill.vocabulary import reject_ignored_fields

logger = logging.getLogger(__name__)


TARGETS = ("black_box", "agreement")
DATASET_RESPONSES = ("chosen", "rejected")


@dataclass
class CycleAlignConfig(TrainingArguments):
    r"""Configuration of [`CycleAlignTrainer`] and of the CycleAlign loop (docs/methods/cyclealign.md).

    Parameters:
        > Parameters that control the cycles

        cycles (`int`, defaults to `3`):
            Number of cycles C; each takes the next chunk of the prompts.
        prompts_per_cycle (`int`, *optional*):
            Prompts per cycle; default: all prompts split into C chunks. Larger than that wraps around the data.
        num_responses (`int`, defaults to `4`):
            Responses N sampled from the white box per prompt and ranked (2 ≤ N ≤ 6 keeps the judge prompt short).
        oversample (`int`, defaults to `2`):
            Draw N·oversample samples and keep the first N distinct; a prompt with fewer than 2 distinct is dropped.
        temperature (`float`, defaults to `1.0`), top_p (`float`, defaults to `0.9`):
            White-box sampling settings (§2.1).
        max_completion_length (`int`, defaults to `128`):
            Longest sampled response, in tokens.
        generation_batch_size (`int`, defaults to `32`):
            Sequences per generation / likelihood-scoring batch of the white box.

        dataset_responses (`bool`, defaults to `False`):
            Also put each prompt's `chosen` / `rejected` responses from the data (a preference dataset) among the
            candidates, after the N samples (cyclealign §9.7, an open question; the paper ranks model samples only).

        > Parameters that control the black box and the demonstrations

        black_box (`dict`):
            The judge: `kind: llm` with data_gen judge keys (`model`, `backend` transformers | vllm | openai,
            `backend_kwargs` e.g. `{base_url: http://host:8000/v1}`, `instruction`, `max_retries` (default 1),
            `temperature`, `max_completion_length`); or `kind: noisy_oracle` (`function: module:function`, `noise`,
            `failure_rate`, `seed`); or `callable` / `reward_model`. A JSON string on the command line.
        static_demonstrations (`str`, *optional*):
            Hand-written demonstrations (.json/.jsonl of prompt, completions, 0-based ranking); default: the
            built-in two; `none`: no static demonstrations.
        dynamic_demonstrations (`int`, defaults to `2`):
            k_d agreement demonstrations added to each black-box query.
        demonstration_selection (`str`, defaults to `"recent"`):
            `recent` (the k_d newest) or `similar` (highest bag-of-words cosine with the query's prompt).
        demonstration_pool_size (`int`, defaults to `500`):
            Capacity of the dynamic pool (FIFO, one entry per prompt).
        min_agreement (`int`, defaults to `3`):
            m_min: an agreement ranking enters the pool if it orders at least this many responses.
        shuffle_candidates (`bool`, defaults to `False`):
            Show the black box each prompt's candidates in a seeded random order (against position bias).
        max_judge_prompt_chars (`int`, *optional*):
            Cap on an LLM judge's prompt in characters: dynamic demonstrations are left out until it fits.

        > Parameters that control the training

        training_target (`str`, defaults to `"black_box"`):
            Rank to learn: `black_box` (ρ_B, all N responses) or `agreement` (α; prompts with |α| < 2 are skipped).
        sft_weight (`float`, defaults to `0.05`):
            β_sft: the SFT term on the top response is weighted β_sft·(n − 1)² (PRO's code).
        length_normalize (`bool`, defaults to `True`):
            Scores (white-box ranking and training) are mean token log-probs; `False`: sums.
        max_length (`int`, defaults to `512`):
            Longest prompt + response in tokens when training (the response is cut).
        reward_function (`str`, *optional*):
            `module:function` of a ground-truth reward, only for logging the mean reward of each cycle's samples
            and of the black box's top choices (the quickstart uses `align_distill.synthetic:reward`).
        trust_remote_code (`bool`, defaults to `False`):
            Allow models and tokenizers that ship their own Python code.

    `num_train_epochs` / `max_steps` apply to each cycle. Changed defaults from `TrainingArguments`:
    `learning_rate=5e-6` (PRO), `logging_steps=10`, `remove_unused_columns=False` (the collator needs the ranked
    candidates), `bf16=None` (bf16 only on a CUDA device that supports it). `label_smoothing_factor` is rejected
    (the PRO loss replaces the Trainer's).

    Deprecated keys (one release): `max_new_tokens` → `max_completion_length`, `sft_beta` → `sft_weight`,
    `length_normalise` → `length_normalize`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {
        "max_new_tokens": "max_completion_length",
        "sft_beta": "sft_weight",
        "length_normalise": "length_normalize",
    }
    ignored_fields: ClassVar[dict[str, str]] = {
        "label_smoothing_factor": "the PRO loss replaces the Trainer's",
    }
    method_label: ClassVar[str] = "CycleAlign"

    cycles: int = field(default=3, metadata={"help": "Number of cycles C."})
    prompts_per_cycle: int | None = field(
        default=None, metadata={"help": "Prompts per cycle (default: the prompts split into C chunks)."}
    )
    num_responses: int = field(default=4, metadata={"help": "Responses N sampled and ranked per prompt."})
    oversample: int = field(
        default=2, metadata={"help": "Draw N·oversample samples, keep the first N distinct responses."}
    )
    temperature: float = field(default=1.0, metadata={"help": "White-box sampling temperature."})
    top_p: float = field(default=0.9, metadata={"help": "White-box nucleus sampling threshold."})
    max_completion_length: int = field(default=128, metadata={"help": "Longest sampled response in tokens."})
    generation_batch_size: int = field(
        default=32, metadata={"help": "Sequences per white-box generation / scoring batch."}
    )
    black_box: dict | str | None = field(
        default=None,
        metadata={
            "help": "The black-box judge as a mapping (YAML) or JSON string: kind llm | noisy_oracle | callable | "
            "reward_model, plus that judge's keys."
        },
    )
    static_demonstrations: str | None = field(
        default=None,
        metadata={"help": "Static demonstrations file (.json/.jsonl); default built-in; 'none' for none."},
    )
    dynamic_demonstrations: int = field(default=2, metadata={"help": "k_d agreement demonstrations per query."})
    demonstration_selection: str = field(
        default="recent", metadata={"help": "recent | similar.", "choices": ["recent", "similar"]}
    )
    demonstration_pool_size: int = field(default=500, metadata={"help": "Capacity of the dynamic pool."})
    min_agreement: int = field(default=3, metadata={"help": "m_min: shortest agreement ranking kept as a demo."})
    shuffle_candidates: bool = field(
        default=False, metadata={"help": "Show candidates to the black box in a seeded random order."}
    )
    max_judge_prompt_chars: int | None = field(
        default=None, metadata={"help": "Cap on the LLM judge's prompt (characters); drops dynamic demos to fit."}
    )
    training_target: str = field(
        default="black_box", metadata={"help": "Ranking to train on: black_box | agreement.", "choices": list(TARGETS)}
    )
    sft_weight: float = field(default=0.05, metadata={"help": "β_sft; SFT weight β_sft·(n−1)²."})
    length_normalize: bool = field(default=True, metadata={"help": "Mean (not summed) token log-probs as scores."})
    max_length: int | None = field(default=512, metadata={"help": "Longest prompt + response when training."})
    reward_function: str | None = field(
        default=None, metadata={"help": "module:function ground-truth reward, for logging only."}
    )
    dataset_responses: bool = field(
        default=False,
        metadata={"help": "Also rank the data's own chosen/rejected responses next to the samples (cyclealign §9.7)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models and tokenizers that ship their own Python code."}
    )

    # changed defaults
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate (PRO: 5e-6)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the ranked-candidate columns for the collator."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: only on a CUDA device that supports it."}
    )

    def __post_init__(self) -> None:

        default_precision(self)
        if isinstance(self.black_box, str):
            try:
                self.black_box = json.loads(self.black_box)
            except json.JSONDecodeError as error:
                raise ValueError(f"black_box must be a mapping or a JSON object string: {error}") from None
        problems = []
        if self.cycles < 1:
            problems.append(f"cycles must be >= 1, got {self.cycles}")
        if self.num_responses < 2:
            problems.append(f"num_responses must be >= 2 (a ranking needs two responses), got {self.num_responses}")
        if self.oversample < 1:
            problems.append(f"oversample must be >= 1, got {self.oversample}")
        if self.prompts_per_cycle is not None and self.prompts_per_cycle < 1:
            problems.append(f"prompts_per_cycle must be >= 1, got {self.prompts_per_cycle}")
        if self.training_target not in TARGETS:
            problems.append(f"training_target must be one of {TARGETS}, got {self.training_target!r}")
        if self.min_agreement < 2:
            problems.append(f"min_agreement must be >= 2, got {self.min_agreement}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (N distinct samples need sampling), got {self.temperature}")
        if problems:
            raise ValueError("CycleAlignConfig: " + "; ".join(problems))
        reject_ignored_fields(self)  # the values as given, before TRL resolves them
        super().__post_init__()
