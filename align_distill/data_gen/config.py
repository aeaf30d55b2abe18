"""Typed configuration of the data-generation jobs, read from YAML plus `--key value` overrides.

Each job has one dataclass; every field has a `help` (shown by `align-distill generate <job> --help`). Values are
checked against the field types when the config is built, and errors say which key, what was expected and what
was found, and in which file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from align_distill import configuration
from align_distill.configuration import build_config, parse_overrides
from align_distill.data_gen.backends.base import SamplingParams
from align_distill.errors import ConfigError, did_you_mean

__all__ = [
    "CONFIGS",
    "ConfigError",
    "GeneratorSpec",
    "JobConfig",
    "JudgeSpec",
    "PairsConfig",
    "RankConfig",
    "RolloutConfig",
    "SampleConfig",
    "SignalsConfig",
    "TeacherSpec",
    "as_config",
    "build_config",
    "describe",
    "load_config",
    "parse_overrides",
]


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class GeneratorSpec:
    """A model behind a `Generator` backend."""

    model: str = _help("Model folder or hub id (for `openai`: the served model name).", "")
    backend: Literal["transformers", "vllm", "openai"] = _help("Generation backend.", "transformers")
    tokenizer: str | None = _help("Tokenizer folder or id; default: the model's.", None)
    revision: str | None = _help("Model revision (hub models); recorded in the fingerprint.", None)
    backend_kwargs: dict[str, Any] = _help(
        "Backend arguments, e.g. {dtype: bfloat16, batch_size: 32} (transformers), {tensor_parallel_size: 2} "
        "(vllm), {base_url: http://host:8000/v1} (openai).",
        factory=dict,
    )

    def check(self, where: str) -> None:
        if not self.model:
            raise ConfigError(f"{where}: `model` is required (a model folder, hub id or served model name)")


@dataclass
class JobConfig:
    """Options every job shares: where rows come from, where they go, how the store is sharded and split."""

    input: str = _help("Input dataset: a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name.", "")
    output_dir: str = _help("Output store folder (created; resumed if it holds this job's unfinished output).", "")
    split: str = _help("Split of the input dataset.", "train")
    limit: int | None = _help("Use only the first `limit` input rows.", None)
    shard_size: int = _help("Input rows per committed shard (the unit of progress saved on a crash).", 64)
    part: int = _help("This process's part (0-based) when `num_parts` processes split the inputs.", 0)
    num_parts: int = _help("Number of parts; part I takes the I-th contiguous slice of the inputs.", 1)
    overwrite: bool = _help("Discard an existing store made by a different job instead of failing.", False)
    progress: bool = _help("Show a progress bar (rows/s, tokens/s); off by itself when not on a terminal.", True)
    lock_kind: Literal["flock", "soft"] | None = _help(
        "Store part locks: flock (default; released by the OS when a writer dies) or soft (a lock file, for "
        "filesystems whose flock is node-local). Default: $ALIGN_DISTILL_STORE_LOCK or flock.",
        None,
    )

    def check(self) -> None:
        where = f"{type(self).__name__}"
        for name in ("input", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{where}: `{name}` is required")
        if self.shard_size < 1:
            raise ConfigError(f"{where}: shard_size must be >= 1, got {self.shard_size}")
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise ConfigError(f"{where}: need 0 <= part < num_parts, got part={self.part}, num_parts={self.num_parts}")


@dataclass
class SampleConfig(JobConfig, GeneratorSpec):
    """`sample`: responses of a (teacher) model to prompts → prompt/completion rows (TRL's format), with the exact
    prompt and completion token ids. With n > 1, `completions` lists all n samples (the `rank` job's input).

    Seeds: sample j of the row with id r is drawn with a seed derived from (seed, r, j), so resuming or splitting
    the job into parts gives the same samples as one uninterrupted run.

    Failed rows: with the `openai` backend a prompt that fails for good (refused, malformed answer, retries spent)
    is committed as a row with `finish_reason: error` and the reason in `error`, and the job goes on; readers skip
    such rows, and `retry_failed: true` generates them again.

    Deprecated key (one release): `max_new_tokens` → `max_completion_length`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {"max_new_tokens": "max_completion_length"}

    n: int = _help("Samples per prompt.", 1)
    temperature: float = _help("Sampling temperature; 0 = greedy.", 1.0)
    top_p: float = _help("Nucleus sampling threshold (1 = off).", 1.0)
    top_k: int = _help("Top-k sampling (0 = off).", 0)
    max_completion_length: int = _help("Maximum response length in tokens.", 256)
    stop: list[str] = _help(
        "Stop strings (left out of the text; the token ids keep the generated tokens).", factory=list
    )
    seed: int = _help("Base seed of the per-row seeds.", 0)
    retry_failed: bool = _help(
        "Generate again the rows that failed for good in an earlier run (backend openai: a prompt the server refused "
        "or answered malformed); each retried row replaces its failed one.",
        False,
    )

    def sampling(self) -> SamplingParams:
        try:
            return SamplingParams(
                n=self.n,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                max_new_tokens=self.max_completion_length,
                stop=tuple(self.stop),
                seed=self.seed,
            )
        except ValueError as error:
            raise ConfigError(f"{type(self).__name__}: {error}") from None

    def check(self) -> None:
        JobConfig.check(self)
        GeneratorSpec.check(self, type(self).__name__)
        self.sampling()


@dataclass
class RolloutConfig(SampleConfig):
    """`rollout`: the student's own responses (on-policy states, e.g. ADPA's student generations); as `sample`,
    greedy by default. Input columns (e.g. chosen/rejected) are kept, so the output is ready for `signals`."""

    temperature: float = _help("Sampling temperature; 0 = greedy (default, as in ADPA).", 0.0)


@dataclass
class TeacherSpec(GeneratorSpec):
    """One teacher of the `signals` job."""

    name: str = _help("Column-name prefix of this teacher's signals, e.g. `dpo`, `ref`.", "teacher")
    gather_at: str | None = _help(
        "Take this teacher's log-probs at another teacher's top-k ids (its name) instead of its own top-k, e.g. the "
        "reference model at the DPO teacher's ids (ADPA `paper` mode).",
        None,
    )


@dataclass
class SignalsConfig(JobConfig):
    """`signals`: per response token, each teacher's top-k token ids and log-probs, the log of the rest mass and the
    token's own log-prob (the teacher-signal cache of DCKD / ADPA / AlignDistil offline).

    Input: a preference dataset (chosen and rejected responses) or a prompt/completion dataset (e.g. `rollout`
    output, whose exact `completion_ids` are used). Signals are computed on exactly the ids the student sees: the
    prompt through the student tokenizer's chat template + the response ids, both recorded in the row.

    Deprecated key (one release): `top_k` → `signals_top_k`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {"top_k": "signals_top_k"}

    teachers: list[TeacherSpec] = _help("Teachers (name, model, backend, ..., gather_at).", factory=list)
    tokenizer: str | None = _help("The student's tokenizer; default: the first teacher's.", None)
    signals_top_k: int = _help("Ids kept per token (signals cost ~4·k + 4 bytes per token per teacher).", 50)
    responses: list[str] | None = _help(
        "Response columns to score; default: chosen and rejected if present, else completion.", None
    )
    id_encoding: Literal["auto", "uint16", "packed"] = _help(
        "Top-k id storage: uint16 (vocabularies up to 65536), packed (ceil(log2 V) bits per id), auto (uint16 when "
        "it fits, else packed).",
        "auto",
    )
    keep_columns: bool = _help("Keep the input's columns next to the signals.", True)

    def check(self) -> None:
        JobConfig.check(self)
        if not self.teachers:
            raise ConfigError("SignalsConfig: `teachers` needs at least one teacher (name, model)")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"SignalsConfig: teacher names must be unique, got {names}")
        for index, teacher in enumerate(self.teachers):
            teacher.check(f"SignalsConfig.teachers[{index}]")
            if teacher.gather_at is not None:
                own = [t.name for t in self.teachers[:index] if t.gather_at is None]
                if teacher.gather_at not in own:
                    raise ConfigError(
                        f"SignalsConfig.teachers[{index}] ({teacher.name}): gather_at={teacher.gather_at!r} must name "
                        f"an earlier teacher with its own top-k; found {own}"
                    )
        if self.signals_top_k < 1:
            raise ConfigError(f"SignalsConfig: signals_top_k must be >= 1, got {self.signals_top_k}")


@dataclass
class JudgeSpec(GeneratorSpec):
    """The judge of the `rank` job.

    Deprecated keys (one release): `max_new_tokens` → `max_completion_length`, `normalize` → `length_normalize`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {
        "max_new_tokens": "max_completion_length",
        "normalize": "length_normalize",
    }

    kind: Literal["llm", "reward_model", "likelihood", "callable"] = _help(
        "llm: a model prompted to rank (any backend); reward_model: AutoModelForSequenceClassification score; "
        "likelihood: the model's (length-normalised) log-likelihood; callable: `function`.",
        "callable",
    )
    function: str = _help(
        "For kind=callable: 'module:function' taking (prompt, response), returning a float or an "
        "object with `.total`.",
        "",
    )
    instruction: str | None = _help(
        "For kind=llm: the ranking instruction (default: judges.DEFAULT_INSTRUCTION).", None
    )
    demonstrations: list[dict[str, Any]] | str | None = _help(
        "For kind=llm: examples {prompt, completions, ranking (0-based, best first)}, inline or a .jsonl/.json file.",
        None,
    )
    max_retries: int = _help("For kind=llm: re-asks of an unparsable answer before the row is marked failed.", 2)
    temperature: float = _help("For kind=llm: the judge's temperature on the first try.", 0.0)
    retry_temperature: float = _help("For kind=llm: temperature of retries (a greedy retry would repeat itself).", 0.7)
    max_completion_length: int = _help("For kind=llm: answer length limit in tokens.", 256)
    seed: int = _help("For kind=llm: base seed of the retries.", 0)
    length_normalize: bool = _help("For kind=likelihood: mean instead of sum of token log-probs.", True)
    batch_size: int = _help("For kind=reward_model: rows per forward pass.", 8)

    def check(self, where: str) -> None:
        if self.kind == "callable":
            if ":" not in self.function:
                raise ConfigError(f"{where}: kind=callable needs function: 'module:function', got {self.function!r}")
        else:
            GeneratorSpec.check(self, where)
        if self.max_retries < 0:
            raise ConfigError(f"{where}: max_retries must be >= 0, got {self.max_retries}")


@dataclass
class RankConfig(JobConfig):
    """`rank`: a judge's scores and/or ranking of the `completions` of each prompt → TRL's ranking format
    (`ranking`: 0-based indices into completions, best first; `scores` when the judge scores). An LLM judge's raw
    answers are kept in `judge_raw`; an answer that cannot be parsed after the retries leaves `ranking` null and
    says why in `judge_error` — it is never guessed."""

    judge: JudgeSpec = _help("The judge.", factory=JudgeSpec)

    def check(self) -> None:
        JobConfig.check(self)
        self.judge.check("RankConfig.judge")


@dataclass
class PairsConfig(JobConfig):
    """`pairs`: rankings (and scores) → preference pairs (prompt, chosen, rejected). Rows whose ranking failed are
    skipped. With scores, pairs with equal scores are never formed."""

    mode: Literal["best_vs_worst", "all_pairs"] = _help(
        "best_vs_worst: one pair per prompt (first vs last of the ranking); all_pairs: every ordered pair.",
        "best_vs_worst",
    )
    min_margin: float = _help("Keep pairs whose score difference is >= this (needs scores when > 0).", 0.0)

    def check(self) -> None:
        JobConfig.check(self)
        if self.min_margin < 0:
            raise ConfigError(f"PairsConfig: min_margin must be >= 0, got {self.min_margin}")


CONFIGS: dict[str, type[JobConfig]] = {
    "sample": SampleConfig,
    "rollout": RolloutConfig,
    "signals": SignalsConfig,
    "rank": RankConfig,
    "pairs": PairsConfig,
}


# -- building configs: align_distill.configuration does the parsing, typing and error messages ------------------
configuration.SHORTHANDS[GeneratorSpec] = "model"  # `teacher: path/to/model` means {model: path/to/model}


def load_config(
    kind: str,
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    source: configuration.Source | None = None,
) -> JobConfig:
    """The `kind` job's config from a YAML file or recipe name (optional) with `overrides` (a mapping, or
    `--key value` arguments) on top, built and checked. `source` names a config given without a file (a pipeline
    stage)."""
    if kind not in CONFIGS:
        raise ConfigError(f"unknown job `{kind}`{did_you_mean(kind, CONFIGS)}; expected one of {', '.join(CONFIGS)}")
    values, loaded = configuration.load_values(path, overrides, label=f"{kind} config")
    source = source if source is not None and path is None else loaded
    hint = f"`align-distill generate {kind} --help` lists its keys"
    (config,) = configuration.build_dataclasses((CONFIGS[kind],), values, source, kind, hint)
    try:
        config.check()
    except ConfigError as error:
        if source.file is None and not source.context:
            raise
        raise ConfigError(f"{source.where()}: {error}") from None
    return config


def as_config(
    kind: str, config: JobConfig | dict[str, Any] | str | Path, source: configuration.Source | None = None
) -> JobConfig:
    """Accept a config object, a dict of keys or a YAML path (or recipe name)."""
    if isinstance(config, JobConfig):
        expected = CONFIGS[kind]
        if type(config) is not expected:
            raise ConfigError(f"job {kind!r} needs a {expected.__name__}, got {type(config).__name__}")
        config.check()
        return config
    if isinstance(config, dict):
        return load_config(kind, None, config, source)
    return load_config(kind, config)


def describe(kind: str) -> str:
    """Help text of a job: its docstring and every key with type, default and help."""
    usage = f"align-distill generate {kind} --config job.yaml [--key value ...] [--overwrite]"
    return configuration.describe_dataclass(CONFIGS[kind], usage)
