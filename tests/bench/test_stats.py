"""Paired bootstrap comparisons (bench/stats.py) against plain computations."""

import statistics

import pytest

from bench.stats import bootstrap_interval, paired_difference, percentile


def test_percentile_matches_linear_interpolation():
    values = [1.0, 2.0, 4.0, 8.0]
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 8.0
    assert percentile(values, 0.5) == pytest.approx(3.0)  # halfway between 2 and 4
    assert percentile(values, 0.25) == pytest.approx(1.75)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = [0.1, -0.05, 0.2, 0.0, 0.15, 0.05, 0.1, -0.02, 0.12, 0.08]
    low, high = bootstrap_interval(values)
    assert low < statistics.fmean(values) < high
    assert (low, high) == bootstrap_interval(values)
    # roughly mean ± 1.96 · standard error for a sample this size
    se = statistics.stdev(values) / len(values) ** 0.5
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert bootstrap_interval([0.3] * 5) == (pytest.approx(0.3), pytest.approx(0.3))


def test_paired_difference_pairs_by_seed_and_counts_sides():
    method = {0: 0.6, 1: 0.7, 2: 0.5, 3: 0.9}
    baseline = {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.4, 7: 0.0}  # seed 7: no partner, ignored
    result = paired_difference(method, baseline)
    assert result.seeds == 4 and result.positive == 2 and result.negative == 1
    assert result.mean == pytest.approx((0.1 + 0.0 - 0.1 + 0.5) / 4)
    assert result.verdict == "no difference" and result.low < 0 < result.high


def test_verdict_needs_an_interval_that_excludes_zero():
    higher = paired_difference({s: 0.5 + 0.01 * s for s in range(10)}, {s: 0.4 for s in range(10)})
    assert higher.verdict == "higher" and higher.low > 0 and higher.positive == 10
    lower = paired_difference({s: 0.4 for s in range(10)}, {s: 0.5 + 0.01 * s for s in range(10)})
    assert lower.verdict == "lower" and lower.as_dict()["verdict"] == "lower"
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})
