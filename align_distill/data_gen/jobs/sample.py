"""`sample` (teacher responses) and `rollout` (student responses): prompts → prompt/completion rows.

Output row (TRL's prompt-completion format plus token ids):
    id, input_index, prompt, prompt_ids, completion, completion_ids, finish_reason, error (null, or why the prompt
    failed for good: a failed row, see below),
    and with n > 1 also completions, completions_ids, finish_reasons (all n samples; `completion` is the first),
    plus the input's other columns (e.g. chosen / rejected of a preference dataset).
`completion` is a string for plain prompts and `[{"role": "assistant", "content": ...}]` for conversational ones.
`completion_ids` are the tokens exactly as generated (EOS included when the model stopped on it).

A prompt that fails for good (the `openai` backend's `record_failures`, on by default here: the server refused it,
answered malformed, or kept failing through the retries) becomes a failed row: `finish_reason` "error", empty
completions, the reason in `error`. The job goes on with the other prompts and logs the count; a rerun does not
stop on the failed row (it is committed), readers of the store skip it, and `retry_failed: true` asks for it again
and replaces it. Failures of the server as a whole (auth, unreachable) still stop the job.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from align_distill.data.tokens import encode_prompts
from align_distill.data_gen.backends import Completion, Generator, generate_with_seeds, make_generator
from align_distill.data_gen.config import JobConfig, SampleConfig, as_config
from align_distill.fingerprint import model_fingerprint, semantic_kwargs, tokenizer_fingerprint

from .inputs import load_inputs
from .runner import kept_types, row_seed, run_store_job

IDS = pa.list_(pa.int32())
SAMPLE_TYPES: dict[str, pa.DataType] = {
    "prompt_ids": IDS,
    "completion_ids": IDS,
    "completions_ids": pa.list_(IDS),
    "input_index": pa.int64(),
    "error": pa.string(),
}
FAILED_COLUMN = "error"
"""The column of a failed row: why its prompt failed for good (null in every good row)."""


def generator_fingerprint(spec: Any, generator: Generator) -> dict[str, Any]:
    """Model files, backend and its output-relevant arguments, and the tokenizer that defines the ids."""
    return {
        "model": model_fingerprint(spec.model, spec.revision),
        "backend": spec.backend,
        "backend_kwargs": semantic_kwargs(spec.backend_kwargs),
        "tokenizer": tokenizer_fingerprint(generator.tokenizer),
    }


def _completion_value(prompt: Any, completion: Completion) -> Any:
    return completion.text if isinstance(prompt, str) else [{"role": "assistant", "content": completion.text}]


def _failure(completions: list[Completion]) -> str | None:
    """Why a prompt failed for good (its completions carry finish_reason "error"), or None for a good row."""
    for completion in completions:
        if completion.finish_reason == "error":
            return completion.error or "generation failed (the backend gave no reason)"
    return None


def _generator_kwargs(backend: str, backend_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The backend's arguments; an OpenAI-compatible server's permanent per-prompt failures are recorded as failed
    rows (unless the config sets record_failures itself), so that one refused prompt does not stop every rerun."""
    if backend == "openai":
        return {"record_failures": True, **backend_kwargs}
    return dict(backend_kwargs)


def run_sample(config: SampleConfig | dict | str | Path, generator: Generator | None = None) -> Path:
    """Teacher samples for every prompt of `config.input`, into the store `config.output_dir`."""
    return _run("sample", as_config("sample", config), generator)


def run_rollout(config: SampleConfig | dict | str | Path, generator: Generator | None = None) -> Path:
    """Student responses (greedy by default) for every prompt; input columns are kept for the `signals` job."""
    return _run("rollout", as_config("rollout", config), generator)


def _run(kind: str, config: JobConfig, generator: Generator | None) -> Path:
    assert isinstance(config, SampleConfig)
    params = config.sampling()
    inputs = load_inputs(config.input, "prompt", config.split, config.limit)
    owned = generator is None
    if generator is None:
        kwargs = _generator_kwargs(config.backend, config.backend_kwargs)
        generator = make_generator(config.backend, config.model, config.tokenizer, **kwargs)
    tokenizer = generator.tokenizer
    produced = {"id", "input_index", "prompt", "prompt_ids", "completion", "completion_ids", "finish_reason"}
    produced.add(FAILED_COLUMN)
    if params.n > 1:
        produced |= {"completions", "completions_ids", "finish_reasons"}

    def process(positions: list[int], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [row["prompt"] for row in rows]
        seeds = [row_seed(params.seed, row["id"]) for row in rows]
        samples = generate_with_seeds(generator, prompts, params, seeds)
        prompt_ids = encode_prompts(tokenizer, prompts)
        out = []
        for position, row, completions, ids in zip(positions, rows, samples, prompt_ids):
            first = completions[0]
            record = {k: v for k, v in row.items() if k not in produced}
            record.update(
                id=row["id"],
                input_index=position,
                prompt=row["prompt"],
                prompt_ids=ids,
                completion=_completion_value(row["prompt"], first),
                completion_ids=first.token_ids,
                finish_reason=first.finish_reason,
                error=_failure(completions),
            )
            if params.n > 1:
                record.update(
                    completions=[_completion_value(row["prompt"], c) for c in completions],
                    completions_ids=[c.token_ids for c in completions],
                    finish_reasons=[c.finish_reason for c in completions],
                )
            out.append(record)
        return out

    def count_tokens(rows: list[dict[str, Any]]) -> int:
        return sum(
            sum(map(len, r["completions_ids"])) if "completions_ids" in r else len(r["completion_ids"]) for r in rows
        )

    try:
        fingerprint = {**generator_fingerprint(config, generator), "sampling": asdict(params)}
        return run_store_job(
            kind,
            config,
            inputs,
            fingerprint,
            process,
            column_types={**kept_types(inputs, produced), **SAMPLE_TYPES},
            count_tokens=count_tokens,
            failed_column=FAILED_COLUMN,
        )
    finally:
        if owned:
            generator.close()
