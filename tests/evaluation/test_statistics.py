"""The package's bootstrap (one implementation, also behind bench/stats.py) against the plain loop it replaces."""

import random
import statistics

import numpy as np
import pytest

from align_distill.evaluation.statistics import (
    bootstrap_interval,
    bootstrap_statistics,
    mean_interval,
    paired_difference,
    percentile,
)


def plain_interval(values, resamples=10_000, seed=0):
    """The reference: resample with `random.Random(seed).choices`, mean, sort, interpolated percentiles."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return percentile(means, 0.025), percentile(means, 0.975)


@pytest.mark.parametrize("n, seed", [(1, 0), (7, 3), (64, 11)])
def test_the_vectorised_bootstrap_equals_the_plain_loop(n, seed):
    rng = random.Random(n)
    values = [rng.gauss(0.5, 0.3) for _ in range(n)]
    for ours, reference in zip(bootstrap_interval(values, 2000, seed), plain_interval(values, 2000, seed)):
        assert ours == pytest.approx(reference, abs=1e-12)


def test_mean_interval_and_a_resampled_statistic():
    values = [0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0]
    result = mean_interval(values, 1000)
    assert result.mean == sum(values) / len(values) and result.low < result.mean < result.high and result.n == 8
    medians = bootstrap_statistics(len(values), lambda rows: float(np.median(np.asarray(values)[rows])), 200)
    assert len(medians) == 200 and list(medians) == sorted(medians) and set(medians) <= {0.0, 0.25, 0.5, 0.75, 1.0}


def test_paired_by_prompt_uses_the_prompts_both_answered():
    model = {"p1": 1.0, "p2": 0.5, "p3": 1.0, "only-model": 0.0}
    baseline = {"p1": 0.0, "p2": 0.5, "p3": 0.0, "only-baseline": 1.0}
    result = paired_difference(model, baseline, 1000)
    assert result.seeds == 3 and result.positive == 2 and result.negative == 0
    assert result.mean == pytest.approx(2 / 3) and result.low <= result.mean <= result.high
