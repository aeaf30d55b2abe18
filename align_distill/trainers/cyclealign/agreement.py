"""Pure helpers on rankings (lists of response ids, best first) for CycleAlign (docs/methods/cyclealign.md §4, §5).

- `agreement_ranking`: the longest list of ids in the same relative order in the black-box and the white-box
  ranking (their LCS), ties broken towards the black-box's top items;
- `kendall_tau`: how far two rankings agree, for logging agreement over cycles;
- `rank_agreement`: one cycle's steps 4-5 over every prompt: agreement, Kendall τ, pool update, training target.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from align_distill.data.tokens import prompt_text, response_text

from .config import TARGETS

logger = logging.getLogger(__name__)

Item = TypeVar("Item", bound=Hashable)


def _number(value: Any) -> float:
    return float(getattr(value, "total", value))


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _check_same_items(first: Sequence[Item], second: Sequence[Item], names: tuple[str, str]) -> None:
    for name, ranking in zip(names, (first, second)):
        if len(set(ranking)) != len(ranking):
            repeated = sorted({repr(x) for x in ranking if list(ranking).count(x) > 1})
            raise ValueError(f"{name} ranking {list(ranking)!r} lists {', '.join(repeated)} more than once")
    if set(first) != set(second):
        only_first = sorted(repr(x) for x in set(first) - set(second))
        only_second = sorted(repr(x) for x in set(second) - set(first))
        raise ValueError(
            f"{names[0]} and {names[1]} rankings must order the same ids; only in {names[0]}: "
            f"[{', '.join(only_first)}], only in {names[1]}: [{', '.join(only_second)}]"
        )


def agreement_ranking(black_box: Sequence[Item], white_box: Sequence[Item]) -> list[Item]:
    """The agreement ranking α = LCS(ρ_B, ρ_W) of two rankings of the same ids (docs/methods/cyclealign.md §5).

    Among several longest common subsequences, returns the one whose positions in `black_box` are
    lexicographically smallest (it keeps the black-box's top items). Built greedily: at each step take the
    earliest black-box item that can still start a longest completion, using the table of suffix LCS lengths.
    """
    _check_same_items(black_box, white_box, ("black-box", "white-box"))
    a, b = list(black_box), list(white_box)
    n = len(a)
    position_in_b = {item: j for j, item in enumerate(b)}
    # suffix[i][j] = LCS length of a[i:] and b[j:]
    suffix = [[0] * (n + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(n - 1, -1, -1):
            if a[i] == b[j]:
                suffix[i][j] = suffix[i + 1][j + 1] + 1
            else:
                suffix[i][j] = max(suffix[i + 1][j], suffix[i][j + 1])

    agreement: list[Item] = []
    i = j = 0
    while suffix[i][j] > 0:
        # the earliest black-box item p whose match q in the white-box leaves a longest completion
        for p in range(i, n):
            q = position_in_b[a[p]]
            if q >= j and 1 + suffix[p + 1][q + 1] == suffix[i][j]:
                agreement.append(a[p])
                i, j = p + 1, q + 1
                break
    return agreement


def kendall_tau(rank_a: Sequence[Item], rank_b: Sequence[Item]) -> float:
    """Kendall's τ (τ-a, no ties in a ranking) of two rankings of the same ids: 1 same order, −1 reversed."""
    _check_same_items(rank_a, rank_b, ("first", "second"))
    n = len(rank_a)
    if n < 2:
        raise ValueError(f"kendall_tau needs rankings of at least 2 ids; got {n}")
    position = {item: k for k, item in enumerate(rank_b)}
    concordant = discordant = 0
    for x in range(n):
        for y in range(x + 1, n):
            # rank_a puts rank_a[x] before rank_a[y]; does rank_b agree?
            if position[rank_a[x]] < position[rank_a[y]]:
                concordant += 1
            else:
                discordant += 1
    return (concordant - discordant) / (n * (n - 1) / 2)


def rank_agreement(
    candidates: list[dict[str, Any]],
    black_box: list[dict[str, Any]],
    white_box: list[dict[str, Any]],
    target: str,
    pool: Any,
    cycle: int,
    reward: Callable[[str, str], Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Steps 4-5 of a cycle: per prompt, the agreement α = LCS(ρ_B, ρ_W) (§5), Kendall τ, the pool update (§6) and
    the training target (ρ_B or α). `black_box` / `white_box` are rank-store rows (`id`, `ranking`, `judge_raw`,
    `judge_error`). A prompt whose black-box ranking failed keeps `target` None: dropped for this cycle, counted.
    `reward(prompt, response)` (optional, ground truth) adds the mean reward of the samples and of ρ_B's top choice.
    Returns the rows (for `rankings.jsonl`) and the cycle's agreement metrics."""
    if target not in TARGETS:
        raise ValueError(f"training target must be one of {TARGETS}, got {target!r}")
    by_id_black = {r["id"]: r for r in black_box}
    by_id_white = {r["id"]: r for r in white_box}
    rows, taus, lengths, exact, errors = [], [], [], [], []
    retried = added = 0
    sample_rewards, top_rewards = [], []
    for candidate in candidates:
        b, w = by_id_black[candidate["id"]], by_id_white[candidate["id"]]
        rho_b, rho_w = b["ranking"], w["ranking"]
        retried += int(len(b.get("judge_raw") or []) > 1)
        if reward is not None:
            text = prompt_text(candidate["prompt"])
            values = [_number(reward(text, response_text(c))) for c in candidate["completions"]]
            sample_rewards.append(mean_or_none(values))
            if rho_b is not None:
                top_rewards.append(values[rho_b[0]])
        row = {**candidate, "black_box": rho_b, "white_box": rho_w, "agreement": None, "kendall_tau": None}
        if rho_b is None:  # §2.2: never guessed — the prompt is dropped for this cycle and counted
            errors.append(b.get("judge_error") or "no ranking")
            rows.append({**row, "target": None, "judge_error": errors[-1]})
            continue
        if rho_w is None:  # the white box's scores were not finite: no agreement, ρ_B still trains
            rows.append({**row, "target": list(rho_b) if target == "black_box" else None, "judge_error": None})
            continue
        alpha = agreement_ranking(rho_b, rho_w)
        taus.append(kendall_tau(rho_b, rho_w))
        lengths.append(len(alpha))
        exact.append(float(list(rho_b) == list(rho_w)))
        added += int(pool.add(candidate["prompt"], candidate["completions"], alpha, cycle))
        rows.append(
            {
                **row,
                "agreement": alpha,
                "kendall_tau": taus[-1],
                "target": list(rho_b) if target == "black_box" else alpha,
                "judge_error": None,
            }
        )
    if errors:
        logger.warning("cyclealign: cycle %d: black box failed on %d prompts, e.g. %s", cycle, len(errors), errors[0])
    metrics = {
        "black_box_failures": len(errors),
        "black_box_failure_rate": len(errors) / max(len(candidates), 1),
        "black_box_retried": retried,
        "agreement_tau": mean_or_none(taus),
        "agreement_length": mean_or_none(lengths),
        "agreement_exact": mean_or_none(exact),
        "demonstrations_added": added,
    }
    if reward is not None:
        metrics["sample_reward"] = mean_or_none(sample_rewards)
        metrics["black_box_top_reward"] = mean_or_none(top_rewards)
    return rows, metrics
