"""`rank`: a judge ranks (and, where it scores, scores) the `completions` of each prompt.

Output row: the input's columns (id, prompt, completions, ...) plus
    ranking       list<int32> 0-based indices into completions, best first (TRL's ranking format); null if the
                  judge failed
    scores        list<float64> one per completion (scoring judges), else null
    judge_raw     list<string> an LLM judge's answers, one per attempt
    judge_error   string, why `ranking` is null (null when it is not)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from align_distill.data import DataProblem, DataValidationError
from align_distill.data_gen.config import RankConfig, as_config
from align_distill.data_gen.judges import Judge, make_judge
from align_distill.fingerprint import model_fingerprint, semantic_kwargs
from align_distill.vocabulary import deprecated_aliases

from .inputs import load_inputs, require_columns
from .runner import kept_types, run_store_job

RANK_TYPES: dict[str, pa.DataType] = {
    "ranking": pa.list_(pa.int32()),
    "scores": pa.list_(pa.float64()),
    "judge_raw": pa.list_(pa.string()),
    "judge_error": pa.string(),
    "input_index": pa.int64(),
}


def run_rank(config: RankConfig | dict | str | Path, judge: Judge | None = None) -> Path:
    """Judge every row's completions; `judge` may be given to reuse a loaded one (its settings should match
    `config.judge`, which is what the fingerprint records)."""
    config = as_config("rank", config)
    assert isinstance(config, RankConfig)
    inputs = load_inputs(config.input, "prompt", config.split, config.limit)
    require_columns(inputs, ["completions"], config.input, "to rank (a list of responses per prompt)")
    problems = [
        DataProblem(
            config.input,
            i + 1,
            "completions",
            f"has {len(c) if isinstance(c, list) else c!r}, expected a list of at least 2 responses",
        )
        for i, c in enumerate(inputs["completions"])
        if not isinstance(c, list) or len(c) < 2
    ]
    if problems:
        raise DataValidationError(problems)
    spec = config.judge
    owned = judge is None
    judge = judge or make_judge(spec)
    produced = set(RANK_TYPES) | {"id"}

    def process(positions: list[int], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        verdicts = judge.judge([r["prompt"] for r in rows], [r["completions"] for r in rows], [r["id"] for r in rows])
        out = []
        for position, row, verdict in zip(positions, rows, verdicts):
            record = {k: v for k, v in row.items() if k not in produced}
            record.update(
                id=row["id"],
                input_index=position,
                ranking=verdict.ranking,
                scores=verdict.scores,
                judge_raw=verdict.raw,
                judge_error=verdict.error,
            )
            out.append(record)
        return out

    # recorded under the keys' former names, so that stores made before the renames still resume
    former = {new: old for old, new in deprecated_aliases(type(spec)).items()}
    judge_identity = {former.get(k, k): v for k, v in vars(spec).items() if k not in ("backend_kwargs", "model")}
    judge_identity["backend_kwargs"] = semantic_kwargs(spec.backend_kwargs)
    if spec.model:
        judge_identity["model"] = model_fingerprint(spec.model, spec.revision)
    try:
        return run_store_job(
            "rank",
            config,
            inputs,
            {"judge": judge_identity},
            process,
            column_types={**kept_types(inputs, produced), **RANK_TYPES},
        )
    finally:
        if owned:
            judge.close()
