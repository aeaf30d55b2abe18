"""Agreement ranking, Kendall τ and score rankings (docs/methods/cyclealign.md §4, §5, cases U1, U2)."""

import itertools
import random

import pytest

from align_distill.data_gen.judges import ranking_from_scores
from align_distill.trainers.cyclealign.agreement import agreement_ranking, kendall_tau


@pytest.mark.parametrize(
    "black_box, white_box, expected",
    [
        ("ABCD", "ABCD", "ABCD"),
        ("ABCD", "BACD", "ACD"),
        ("ABCD", "DCBA", "A"),
        ("ABCDE", "ACBED", "ABD"),
        ([3, 1, 4, 2], [1, 3, 4, 2], [3, 4, 2]),
        ("ABCD", "BCDA", "BCD"),
    ],
)
def test_spec_u1_cases(black_box, white_box, expected):
    assert agreement_ranking(list(black_box), list(white_box)) == list(expected)


def _brute_force(black_box, white_box):
    """Largest subsets of black-box positions whose order the white-box keeps; smallest position tuple wins."""
    where = {item: k for k, item in enumerate(white_box)}
    n = len(black_box)
    for size in range(n, 0, -1):
        for positions in itertools.combinations(range(n), size):  # lexicographic order
            in_white = [where[black_box[p]] for p in positions]
            if in_white == sorted(in_white):
                return [black_box[p] for p in positions]
    return []


def _spec_backtrace(black_box, white_box):
    """The the method page's greedy back-trace: on a tie of remaining LCS lengths, skip the white-box item."""
    a, b, n = black_box, white_box, len(black_box)
    table = [[0] * (n + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(n - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
    out, i, j = [], 0, 0
    while i < n and j < n:
        if a[i] == b[j]:
            out.append(a[i])
            i, j = i + 1, j + 1
        elif table[i + 1][j] > table[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


def test_matches_brute_force_and_spec_backtrace_on_random_rankings():
    rng = random.Random(0)
    for n in range(1, 7):
        for _ in range(150):
            black_box = rng.sample(range(n), n)
            white_box = rng.sample(range(n), n)
            expected = _brute_force(black_box, white_box)
            assert agreement_ranking(black_box, white_box) == expected, (black_box, white_box)
            assert _spec_backtrace(black_box, white_box) == expected, (black_box, white_box)


def test_exhaustive_n4():
    for black_box in itertools.permutations("ABCD"):
        for white_box in itertools.permutations("ABCD"):
            assert agreement_ranking(black_box, white_box) == _brute_force(black_box, white_box)


def test_agreement_rejects_rankings_of_different_ids():
    with pytest.raises(ValueError, match="only in black-box: \\['D'\\], only in white-box: \\['E'\\]"):
        agreement_ranking("ABCD", "ABCE")
    with pytest.raises(ValueError, match="white-box ranking .* lists 'A' more than once"):
        agreement_ranking("ABC", "AAB")


def _tau_reference(rank_a, rank_b):
    pa = {x: k for k, x in enumerate(rank_a)}
    pb = {x: k for k, x in enumerate(rank_b)}
    items = list(rank_a)
    total = 0
    for x, y in itertools.combinations(items, 2):
        sa = 1 if pa[x] < pa[y] else -1
        sb = 1 if pb[x] < pb[y] else -1
        total += sa * sb
    return total / (len(items) * (len(items) - 1) / 2)


def test_kendall_tau_known_values_and_reference():
    assert kendall_tau("ABCD", "ABCD") == 1.0
    assert kendall_tau("ABCD", "DCBA") == -1.0
    assert kendall_tau("ABCD", "BACD") == pytest.approx(4 / 6)  # one discordant pair of six
    rng = random.Random(1)
    for n in range(2, 8):
        a, b = rng.sample(range(n), n), rng.sample(range(n), n)
        assert kendall_tau(a, b) == pytest.approx(_tau_reference(a, b))
        assert kendall_tau(a, b) == pytest.approx(kendall_tau(b, a))
    with pytest.raises(ValueError, match="at least 2 ids; got 1"):
        kendall_tau([0], [0])


def test_ranking_from_scores_spec_u2_and_ties():
    # U2: length-normalised scores (-1.0, -0.6667) rank y_2 first; summed (-3.0, -4.0) rank y_1 first
    assert ranking_from_scores([-3.0 / 3, -4.0 / 6]) == [1, 0]
    assert ranking_from_scores([-3.0, -4.0]) == [0, 1]
    assert ranking_from_scores([0.5, 2.0, 0.5, 2.0]) == [1, 3, 0, 2]
    assert ranking_from_scores([0.5, 2.0, 0.5, 2.0], higher_is_better=False) == [0, 2, 1, 3]
    assert ranking_from_scores([]) == []
    with pytest.raises(ValueError, match="NaN at index \\[1\\]"):
        ranking_from_scores([0.0, float("nan")])
