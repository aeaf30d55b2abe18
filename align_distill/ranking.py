"""Pure helpers on rankings (lists of response ids, best first) for CycleAlign (specs/cyclealign.md §4, §5).

- `agreement_ranking`: the longest list of ids in the same relative order in the black-box and the white-box
  ranking (their LCS), ties broken towards the black-box's top items;
- `kendall_tau`: how far two rankings agree, for logging agreement over cycles;
- `ranking_from_scores`: the white-box "judgment" — ids sorted by score, ties by lower id.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TypeVar

Item = TypeVar("Item", bound=Hashable)


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
    """The agreement ranking α = LCS(ρ_B, ρ_W) of two rankings of the same ids (spec §5).

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


def ranking_from_scores(scores: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of `scores` best first; equal scores keep the lower index first (deterministic)."""
    values = [float(s) for s in scores]
    bad = [k for k, v in enumerate(values) if math.isnan(v)]
    if bad:
        raise ValueError(f"cannot rank NaN scores; found NaN at index {bad}")
    # Python's sort is stable, so equal keys keep index order in both directions.
    return sorted(range(len(values)), key=lambda k: -values[k] if higher_is_better else values[k])
