"""Pairwise judging against a baseline: each prompt is judged twice, the model's answer first and then second, so a
judge that prefers a position cannot move the win-rate.

Per prompt, from the two verdicts (the strict `Ranking: [i] > [j]` parser of `align_distill.data_gen.judges`):
  - both orders prefer the model → 1 (a win); both prefer the baseline → 0 (a loss);
  - the orders disagree → 0.5 (a tie: the verdict followed the position, not the answer);
  - either order unparsable after the judge's retries → no preference; the prompt is left out of the win-rate and
    counted as unparsable (reported with the judge's last error).
The win-rate is the mean preference, ties counting half.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from align_distill.data.tokens import response_text

ORDERS = ("model_first", "baseline_first")


def judgement_rows(
    prompts: list[dict[str, Any]], answers: Mapping[str, Any], baseline: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The `rank` job's input: two rows per prompt both models answered (ids `<prompt id>/model_first` and
    `<prompt id>/baseline_first`), each with the two answers as `completions`."""
    rows = []
    for row in prompts:
        key = row["id"]
        if key not in answers or key not in baseline:
            continue
        mine, theirs = answers[key], baseline[key]
        rows.append({"id": f"{key}/model_first", "prompt": row["prompt"], "completions": [mine, theirs]})
        rows.append({"id": f"{key}/baseline_first", "prompt": row["prompt"], "completions": [theirs, mine]})
    return rows


@dataclass(frozen=True)
class PairVerdict:
    """One prompt's outcome: `preference` 1 / 0.5 / 0 for the model, or None when a verdict was unparsable."""

    preference: float | None
    model_first: int | None  # the winning position (0 or 1) of each order, None when unparsable
    baseline_first: int | None
    error: str | None = None


def _winner(judged: Mapping[str, Any] | None) -> tuple[int | None, str | None]:
    if judged is None:
        return None, "not judged"
    ranking = judged.get("ranking")
    if not ranking:
        return None, judged.get("judge_error") or "no ranking"
    return int(ranking[0]), None


def combine(model_first: Mapping[str, Any] | None, baseline_first: Mapping[str, Any] | None) -> PairVerdict:
    """A prompt's preference from its two judged rows (see the module docstring)."""
    first, first_error = _winner(model_first)
    second, second_error = _winner(baseline_first)
    if first is None or second is None:
        return PairVerdict(None, first, second, first_error or second_error)
    model_wins = (first == 0) + (second == 1)  # the model sits at position 0, then at position 1
    return PairVerdict({2: 1.0, 1: 0.5, 0: 0.0}[model_wins], first, second)


def answer_length(answer: Any) -> int:
    """Characters of an answer's text: the length the LC regression controls for (tokenizer-independent)."""
    return len(response_text(answer))
