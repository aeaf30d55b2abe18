"""`pairs`: rankings (and scores) → preference pairs in TRL's format (prompt, chosen, rejected).

Modes: `best_vs_worst` gives one pair per prompt (ranking[0] vs ranking[-1]); `all_pairs` every pair (i, j) with i
ranked above j, in ranking order. With scores, a pair is kept only if score(chosen) − score(rejected) is > 0 and
>= `min_margin`; without scores, `min_margin` > 0 is an error. Rows whose ranking failed (null) are skipped, and so
are rows with an empty response (a sample that stopped at once: it can be ranked, but is no valid DPO response).
A pair whose chosen and rejected responses are identical (two samples that came out the same, e.g. greedy or short
completions) teaches nothing and is skipped; the number skipped is logged at the end.

Output row: id ("{input id}:{i}>{j}", i and j 0-based completion indices), input_index, pair_index, prompt,
chosen, rejected, chosen_index, rejected_index, and score_chosen / score_rejected / margin when scores exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from align_distill.data import DataProblem, DataValidationError
from align_distill.data_gen.config import PairsConfig, as_config

from .inputs import load_inputs
from .runner import kept_types, run_store_job

logger = logging.getLogger("align_distill.data_gen")

PAIR_TYPES: dict[str, pa.DataType] = {
    "input_index": pa.int64(),
    "pair_index": pa.int32(),
    "chosen_index": pa.int32(),
    "rejected_index": pa.int32(),
    "score_chosen": pa.float64(),
    "score_rejected": pa.float64(),
    "margin": pa.float64(),
}


def preference_pairs(
    ranking: list[int], scores: list[float] | None, mode: str = "best_vs_worst", min_margin: float = 0.0
) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs from one ranking (0-based, best first)."""
    if mode == "best_vs_worst":
        candidates = [(ranking[0], ranking[-1])] if len(ranking) >= 2 else []
    elif mode == "all_pairs":
        candidates = [(ranking[a], ranking[b]) for a in range(len(ranking)) for b in range(a + 1, len(ranking))]
    else:
        raise ValueError(f"mode must be best_vs_worst or all_pairs, got {mode!r}")
    if scores is None:
        if min_margin > 0:
            raise ValueError(f"min_margin={min_margin} needs scores, but the rankings have none")
        return candidates
    return [(i, j) for i, j in candidates if scores[i] - scores[j] > 0 and scores[i] - scores[j] >= min_margin]


def _blank(response: Any) -> bool:
    if isinstance(response, list) and response and isinstance(response[-1], dict):
        response = response[-1].get("content")
    return isinstance(response, str) and not response.strip()


def _judged(record: dict[str, Any]) -> bool:
    """Rows to pair: judged (ranking or scores) and without empty responses (skipped and counted, not an error)."""
    judged = record.get("ranking") is not None or record.get("scores") is not None
    return judged and not any(_blank(c) for c in record.get("completions") or [])


def run_pairs(config: PairsConfig | dict | str | Path) -> Path:
    """Preference pairs from the rankings in `config.input` (e.g. a `rank` store's parquet files)."""
    config = as_config("pairs", config)
    assert isinstance(config, PairsConfig)
    inputs = load_inputs(
        config.input,
        "ranking",
        config.split,
        config.limit,
        keep=_judged,
    )
    if config.min_margin > 0 and "scores" not in inputs.column_names:
        raise DataValidationError(
            [DataProblem(config.input, None, "scores", f"missing column; min_margin={config.min_margin} needs scores")]
        )
    produced = set(PAIR_TYPES) | {
        "id",
        "prompt",
        "chosen",
        "rejected",
        "completions",
        "ranking",
        "scores",
        "judge_raw",
        "judge_error",
    }

    identical = 0

    def process(positions: list[int], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal identical
        out = []
        for position, row in zip(positions, rows):
            scores = row.get("scores")
            candidates = preference_pairs(row["ranking"], scores, config.mode, config.min_margin)
            completions = row["completions"]
            pairs = [(i, j) for i, j in candidates if completions[i] != completions[j]]
            identical += len(candidates) - len(pairs)
            for number, (i, j) in enumerate(pairs):
                record = {k: v for k, v in row.items() if k not in produced}
                record.update(
                    id=f"{row['id']}:{i}>{j}",
                    input_index=position,
                    pair_index=number,
                    prompt=row["prompt"],
                    chosen=row["completions"][i],
                    rejected=row["completions"][j],
                    chosen_index=i,
                    rejected_index=j,
                )
                if scores is not None:
                    record.update(score_chosen=scores[i], score_rejected=scores[j], margin=scores[i] - scores[j])
                out.append(record)
        return out

    store = run_store_job(
        "pairs",
        config,
        inputs,
        {"mode": config.mode, "min_margin": config.min_margin},
        process,
        column_types={**kept_types(inputs, produced), **PAIR_TYPES},
        order_by=("input_index", "pair_index"),
    )
    if identical:
        logger.warning(
            "%s: skipped %d pair%s whose chosen and rejected responses are identical",
            config.input,
            identical,
            "" if identical == 1 else "s",
        )
    return store
