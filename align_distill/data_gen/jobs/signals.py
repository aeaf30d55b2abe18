"""`signals`: the teacher-signal cache — per response token, each teacher's top-k ids and log-probs, the log rest
mass and the token's own log-prob, on exactly the token ids the student will see (format: `teacher_signals`).

Token ids: the prompt goes through the student tokenizer (chat template with the generation prompt); a response
with recorded ids (`{r}_ids`, e.g. `completion_ids` of a rollout) is used as is, a response given as text is
tokenized with its prompt by TRL's rule (see `tokens`). As TRL does for chosen/rejected, the prompt is cut to the
prefix that every response of the row shares with it. Both are stored in the row for the trainer to verify.

All teachers must share the student's vocabulary. They are loaded together and run one after another on each
shard; a teacher with `gather_at` is scored at the named teacher's top-k ids (one forward pass, no own top-k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import AutoTokenizer

from align_distill.data import DataProblem, DataValidationError
from align_distill.data_gen.backends import Generator, TokenScores, make_generator
from align_distill.data_gen.config import SignalsConfig, as_config
from align_distill.data_gen.tokens import encode_prompt, encode_prompt_response

from .fingerprint import tokenizer_fingerprint
from .inputs import load_inputs
from .runner import kept_types, run_store_job
from .sample import IDS, generator_fingerprint
from .teacher_signals import SignalsEncoding, column_names, fp16


def detect_responses(columns: list[str]) -> list[str]:
    if "chosen" in columns or "rejected" in columns:
        return [c for c in ("chosen", "rejected") if c in columns]
    if "completion" in columns:
        return ["completion"]
    return []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(
    tokenizer: Any, row: dict[str, Any], responses: list[str], where: str
) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [response ids per response column]) of one input row, as the student will see them."""
    prompt_ids = encode_prompt(tokenizer, row["prompt"])
    recorded = row.get("prompt_ids")
    if recorded is not None and list(recorded) != prompt_ids:
        raise DataValidationError(
            [
                DataProblem(
                    where,
                    None,
                    "prompt_ids",
                    "differ from the prompt tokenized with the "
                    "student tokenizer and chat template; the rows were made with another "
                    "tokenizer or template",
                )
            ]
        )
    fulls = []
    for response in responses:
        ids = row.get(f"{response}_ids")
        if ids is not None:
            fulls.append(prompt_ids + list(ids))
        else:
            if row.get(response) is None:
                raise DataValidationError([DataProblem(where, None, response, "missing response to score")])
            p, r = encode_prompt_response(tokenizer, row["prompt"], row[response])
            fulls.append(p + r)
    cut = min([len(prompt_ids), *(_common_prefix(prompt_ids, full) for full in fulls)])
    return prompt_ids[:cut], [full[cut:] for full in fulls]


def run_signals(
    config: SignalsConfig | dict | str | Path,
    generators: dict[str, Generator] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Compute the teacher-signal cache of `config.input` into `config.output_dir`. `generators` (by teacher name) and
    `tokenizer` (the student's) may be given to reuse loaded models."""
    config = as_config("signals", config)
    assert isinstance(config, SignalsConfig)
    chosen: list[str] = []

    def pick_format(columns: list[str]) -> str:
        chosen.extend(config.responses or detect_responses(columns))
        if not chosen:
            raise DataValidationError(
                [
                    DataProblem(
                        config.input,
                        None,
                        None,
                        "no responses to score: expected chosen"
                        "/rejected or completion columns, or set `responses` (columns "
                        f"found: {', '.join(columns)})",
                    )
                ]
            )
        return "preference" if {"chosen", "rejected"} <= set(columns) else "completion"

    inputs = load_inputs(config.input, pick_format, config.split, config.limit)
    responses = chosen
    missing = [r for r in responses if r not in inputs.column_names and f"{r}_ids" not in inputs.column_names]
    if missing:
        raise DataValidationError([DataProblem(config.input, None, r, "missing response column") for r in missing])

    owned = {}
    generators = dict(generators or {})
    try:
        for teacher in config.teachers:
            if teacher.name not in generators:
                generators[teacher.name] = owned[teacher.name] = make_generator(
                    teacher.backend, teacher.model, teacher.tokenizer, **teacher.backend_kwargs
                )
        first = generators[config.teachers[0].name]
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer) if config.tokenizer else first.tokenizer
        vocab = tokenizer.get_vocab()
        for teacher in config.teachers:
            if generators[teacher.name].tokenizer.get_vocab() != vocab:
                raise ValueError(
                    f"teacher {teacher.name!r} ({teacher.model}) has a different vocabulary from the "
                    "student tokenizer; the signals need one shared vocabulary"
                )
        vocab_size = max([len(tokenizer), *(getattr(g, "vocab_size", 0) for g in generators.values())])
        encoding = SignalsEncoding.choose(config.top_k, vocab_size, config.id_encoding)
        return _run(config, inputs, responses, generators, tokenizer, encoding)
    finally:
        for generator in owned.values():
            generator.close()


def _run(
    config: SignalsConfig,
    inputs: Any,
    responses: list[str],
    generators: dict[str, Generator],
    tokenizer: Any,
    encoding: SignalsEncoding,
) -> Path:
    teachers = config.teachers
    produced = {"id", "input_index", "prompt_ids", *(f"{r}_ids" for r in responses)}
    types: dict[str, pa.DataType] = {"prompt_ids": IDS, "input_index": pa.int64()}
    for response in responses:
        types[f"{response}_ids"] = IDS
        for teacher in teachers:
            names = column_names(response, teacher.name)
            produced |= set(names.values())
            if teacher.gather_at is None:
                types[names["topk_ids"]] = encoding.ids_type
            for key in ("topk_logprobs", "rest_logmass", "token_logprobs"):
                types[names[key]] = pa.list_(pa.float16())

    def process(positions: list[int], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tokenized = [
            tokenize_row(tokenizer, row, responses, f"{config.input}:row {position + 1}")
            for position, row in zip(positions, rows)
        ]
        flat_prompts = [p for p, rs in tokenized for _ in rs]
        flat_responses = [r for _, rs in tokenized for r in rs]
        scores: dict[str, list[TokenScores]] = {}
        for teacher in teachers:
            gather = [s.topk_ids for s in scores[teacher.gather_at]] if teacher.gather_at else None
            scores[teacher.name] = generators[teacher.name].score(
                flat_prompts, flat_responses, config.top_k, gather_ids=gather
            )
        out, flat = [], 0
        for position, row, (prompt_ids, response_ids) in zip(positions, rows, tokenized):
            record = {k: v for k, v in row.items() if k not in produced} if config.keep_columns else {}
            record.update(id=row["id"], input_index=position, prompt_ids=prompt_ids)
            for response, ids in zip(responses, response_ids):
                record[f"{response}_ids"] = ids
                for teacher in teachers:
                    names, s = column_names(response, teacher.name), scores[teacher.name][flat]
                    if teacher.gather_at is None:
                        record[names["topk_ids"]] = encoding.encode_ids(s.topk_ids)
                    record[names["topk_logprobs"]] = fp16(s.topk_logprobs)
                    record[names["rest_logmass"]] = fp16(s.rest_logmass)
                    record[names["token_logprobs"]] = fp16(s.token_logprobs)
                flat += 1
            out.append(record)
        return out

    fingerprint = {
        "teachers": [
            {"name": t.name, "gather_at": t.gather_at, **generator_fingerprint(t, generators[t.name])}
            for t in teachers
        ],
        "student_tokenizer": tokenizer_fingerprint(tokenizer),
        "top_k": config.top_k,
        "responses": responses,
        "encoding": encoding.to_dict(),
        "keep_columns": config.keep_columns,
    }
    metadata = {
        "signals": {
            "encoding": encoding.to_dict(),
            "teachers": [{"name": t.name, "gather_at": t.gather_at} for t in teachers],
            "responses": responses,
        }
    }
    column_types = {**(kept_types(inputs, produced) if config.keep_columns else {}), **types}
    return run_store_job(
        "signals",
        config,
        inputs,
        fingerprint,
        process,
        column_types=column_types,
        metadata=metadata,
        count_tokens=lambda rows: sum(len(r[f"{resp}_ids"]) for r in rows for resp in responses),
    )
