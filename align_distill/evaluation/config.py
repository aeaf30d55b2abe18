"""`EvaluateConfig`: what `align-distill evaluate` and a pipeline's `evaluate` stage read (YAML + `--key value`).

> Parameters that say what is evaluated: `prompts`, `split`, `limit`, `models`, `baseline`, `output_dir`
> Parameters of the generation (shared by every model): `generation`
> Parameters of the scorers (each optional, any combination): `pairwise_judge`, `reward_model`, `checkers`
> Parameters of the intervals: `bootstrap_resamples`, `bootstrap_seed`
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from align_distill import configuration
from align_distill.data_gen.config import GeneratorSpec, JudgeSpec
from align_distill.errors import ConfigError


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class EvaluatedModel(GeneratorSpec):
    """One evaluated model: a model folder or hub id, a LoRA adapter folder (merged into its base once, under
    `output_dir/merged/`), or a model served by an OpenAI-compatible endpoint (`backend: openai`). A plain string
    means `{model: STRING}`."""

    base: str | None = _help(
        "For a LoRA adapter folder: its base model (default: the adapter's base_model_name_or_path).", None
    )


@dataclass
class GenerationSettings:
    """How every model answers the prompts (the `sample` job's settings, one answer per prompt)."""

    temperature: float = _help("Sampling temperature; 0 = greedy (default).", 0.0)
    top_p: float = _help("Nucleus sampling threshold (1 = off).", 1.0)
    top_k: int = _help("Top-k sampling (0 = off).", 0)
    max_completion_length: int = _help("Maximum answer length in tokens.", 256)
    stop: list[str] = _help("Stop strings (left out of the text).", factory=list)
    seed: int = _help("Base seed of the per-prompt seeds (sampling only).", 0)
    shard_size: int = _help("Prompts per committed shard of a model's answers (the unit of resumption).", 64)
    progress: bool = _help("Show progress bars.", True)


@dataclass
class PairwiseJudge(JudgeSpec):
    """An LLM judge that compares each model's answer with the baseline model's, in both orders (see
    docs/evaluation.md). Any `rank` judge works (`kind`: llm by default; a callable or reward model ranks by score,
    and equal scores become a tie through the order swap)."""

    kind: Literal["llm", "reward_model", "likelihood", "callable"] = _help(
        "llm (default): a model prompted to rank the two answers; or any other `rank` judge kind.", "llm"
    )


@dataclass
class RewardModel:
    """A sequence-classification reward model: score = logit 0 of prompt + answer (through its chat template)."""

    model: str = _help("Reward model folder or hub id.", "")
    tokenizer: str | None = _help("Its tokenizer (default: the model's).", None)
    revision: str | None = _help("Hub revision.", None)
    batch_size: int = _help("Rows per forward pass.", 8)
    max_length: int | None = _help("Truncate prompt + answer to this many tokens.", None)
    dtype: str = _help("auto, float32, bfloat16 or float16.", "auto")
    device: str = _help("auto, cpu, cuda, cuda:1, ...", "auto")


@dataclass
class EvaluateConfig:
    """`align-distill evaluate`: answers of one or more models to a prompt set (through the resumable `sample` store),
    scored by an LLM judge against a baseline model, a reward model and/or Python checkers, with bootstrap 95 %
    intervals. Writes `results.json` (per-prompt rows and summaries), `eval.json` (each model's headline numbers),
    `report.md` and plots to `output_dir`.

    > Parameters that say what is evaluated: prompts, split, limit, models, baseline, output_dir
    > Parameters of the generation: generation (temperature 0 = greedy by default)
    > Parameters of the scorers (each optional, any combination): pairwise_judge, reward_model, checkers
    > Parameters of the intervals: bootstrap_resamples, bootstrap_seed
    """

    prompts: str = _help(
        "Prompt set: a .jsonl/.json/.parquet/.csv file, a save_to_disk folder, a store or a hub name.", ""
    )
    split: str = _help("Split of the prompt set.", "train")
    limit: int | None = _help("Use only the first `limit` prompts.", None)
    output_dir: str = _help("Output folder (generations and judgements inside it resume on a rerun).", "")
    models: dict[str, EvaluatedModel] = _help(
        "Models by label: `label: path`, or `label: {model, backend, backend_kwargs, tokenizer, base}`.", factory=dict
    )
    baseline: str | None = _help(
        "Label of the model the others are compared with (the judge's baseline; paired score differences).", None
    )
    generation: GenerationSettings = _help("Generation settings shared by every model.", factory=GenerationSettings)
    pairwise_judge: PairwiseJudge | None = _help("Win-rate against `baseline` with this judge (both orders).", None)
    reward_model: RewardModel | None = _help("Mean and distribution of this reward model's scores.", None)
    checkers: dict[str, str] = _help(
        "Python checkers by name: 'module:function' or 'file.py:function' taking (prompt, response[, row]) and "
        "returning a number, or a mapping of named numbers (e.g. align_distill.evaluation.checkers:synthetic_task).",
        factory=dict,
    )
    bootstrap_resamples: int = _help("Bootstrap resamples of every interval.", 10_000)
    bootstrap_seed: int = _help("Seed of the bootstrap (same data, same intervals).", 0)

    def check(self) -> None:
        for key in ("prompts", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"`{key}` is required")
        if not self.models:
            raise ConfigError("`models` needs at least one model (label: path)")
        for label, spec in self.models.items():
            spec.check(f"models.{label}")
        if self.baseline is not None and self.baseline not in self.models:
            raise ConfigError(
                f"baseline: {self.baseline!r} is not one of the models ({', '.join(self.models)}){_hint(self)}"
            )
        if self.pairwise_judge is not None:
            if self.baseline is None:
                raise ConfigError(
                    "pairwise_judge needs `baseline`: the label of the model every other is judged against"
                )
            if len(self.models) < 2:
                raise ConfigError("pairwise_judge needs at least two models: the baseline and one to compare")
            self.pairwise_judge.check("pairwise_judge")
        if self.reward_model is not None and not self.reward_model.model:
            raise ConfigError("reward_model.model is required (a sequence-classification model folder or hub id)")
        for name, function in self.checkers.items():
            if ":" not in function:
                raise ConfigError(
                    f"checkers.{name}: expected 'module:function' or 'file.py:function', got {function!r}"
                )
        if not (self.pairwise_judge or self.reward_model or self.checkers):
            raise ConfigError("no scorer: set pairwise_judge, reward_model and/or checkers")
        if self.bootstrap_resamples < 1 or self.generation.shard_size < 1:
            raise ConfigError("bootstrap_resamples and generation.shard_size must be >= 1")


def _hint(config: EvaluateConfig) -> str:
    return "; set `baseline` to one of them" if config.models else ""


USAGE = "usage: align-distill evaluate --config FILE|RECIPE [--key value ...]"


def load_evaluate_config(
    path: str | None, overrides: dict[str, Any] | list[str] | None, source: configuration.Source | None = None
) -> EvaluateConfig:
    """The config from a YAML file or recipe name (optional) with overrides on top, built and checked; errors name
    the file (or `source`, a pipeline stage) and the key."""
    values, loaded = configuration.load_values(path, overrides, label="evaluate config")
    source = source if source is not None and path is None else loaded
    hint = "`align-distill evaluate --help` lists its keys"
    (config,) = configuration.build_dataclasses((EvaluateConfig,), values, source, "evaluate", hint)
    try:
        config.check()
    except ConfigError as error:
        raise ConfigError(f"{source.where()}: {error}") from None
    return config
