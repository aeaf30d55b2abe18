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
from align_distill.data.tokens import common_prefix, encode_full, encode_prompts
from align_distill.data_gen.backends import Generator, TokenScores, make_generator
from align_distill.data_gen.config import SignalsConfig, as_config
from align_distill.fingerprint import tokenizer_fingerprint

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


def tokenize_rows(
    tokenizer: Any, rows: list[dict[str, Any]], responses: list[str], source: str, row_numbers: list[int]
) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [response ids per response column]) of each input row, as the student will see them;
    `row_numbers` (1-based) name the rows in errors."""
    prompt_ids = encode_prompts(tokenizer, [row["prompt"] for row in rows])
    text_pairs = [
        (r, n)
        for r, row in enumerate(rows)
        for n, response in enumerate(responses)
        if row.get(f"{response}_ids") is None
    ]
    for r, n in text_pairs:
        if rows[r].get(responses[n]) is None:
            raise DataValidationError([DataProblem(source, row_numbers[r], responses[n], "missing response to score")])
    fulls = encode_full(
        tokenizer, [rows[r]["prompt"] for r, _ in text_pairs], [rows[r][responses[n]] for r, n in text_pairs]
    )
    full_of = dict(zip(text_pairs, fulls))
    result = []
    for r, (row, ids) in enumerate(zip(rows, prompt_ids)):
        recorded = row.get("prompt_ids")
        if recorded is not None and list(recorded) != ids:
            raise DataValidationError(
                [
                    DataProblem(
                        source,
                        row_numbers[r],
                        "prompt_ids",
                        "differ from the prompt tokenized with the student tokenizer and chat template; the rows "
                        "were made with another tokenizer or template",
                    )
                ]
            )
        full = [
            full_of[(r, n)] if (r, n) in full_of else ids + list(row[f"{response}_ids"])
            for n, response in enumerate(responses)
        ]
        cut = min([len(ids), *(common_prefix(ids, f) for f in full)])  # TRL: the prefix every response shares
        result.append((ids[:cut], [f[cut:] for f in full]))
    return result


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
        encoding = SignalsEncoding.choose(config.signals_top_k, vocab_size, config.id_encoding)
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

    def prepare(positions: list[int], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list]:
        """Tokenization: one shard ahead of the teacher forwards, in the runner's prepare thread."""
        return rows, tokenize_rows(tokenizer, rows, responses, config.input, [p + 1 for p in positions])

    def process(positions: list[int], prepared: tuple[list[dict[str, Any]], list]) -> list[dict[str, Any]]:
        rows, tokenized = prepared
        flat_prompts = [p for p, rs in tokenized for _ in rs]
        flat_responses = [r for _, rs in tokenized for r in rs]
        scores: dict[str, list[TokenScores]] = {}
        for teacher in teachers:
            gather = [s.topk_ids for s in scores[teacher.gather_at]] if teacher.gather_at else None
            scores[teacher.name] = generators[teacher.name].score(
                flat_prompts, flat_responses, config.signals_top_k, gather_ids=gather
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
        "top_k": config.signals_top_k,  # the fingerprint keeps the former key: older stores still resume
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
        prepare=prepare,
    )
