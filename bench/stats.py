"""Paired comparisons over seeds: mean difference, a bootstrap 95 % interval, and how many seeds favour each side.

A method and its baseline are trained from the same SFT student with the same data for each seed, so their results
are paired by seed; the seed-to-seed spread (different tiny models and data) cancels in the difference.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass

RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedDifference:
    """method − baseline over paired seeds."""

    mean: float
    low: float  # 2.5 % percentile of the bootstrap distribution of the mean
    high: float  # 97.5 %
    positive: int  # seeds where method > baseline
    negative: int
    seeds: int

    @property
    def verdict(self) -> str:
        """What the interval supports: a difference only when it excludes 0."""
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "no difference"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values, q in [0, 1]."""
    position = q * (len(sorted_values) - 1)
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def bootstrap_interval(values: list[float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of `values` (fixed seed: same data, same interval)."""
    if not values:
        raise ValueError("bootstrap_interval: no values")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    return percentile(means, 0.025), percentile(means, 0.975)


def paired_difference(method: dict[int, float], baseline: dict[int, float]) -> PairedDifference:
    """Compare two {seed: value} maps on the seeds both have."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        raise ValueError("paired_difference: the two methods share no seed")
    differences = [method[s] - baseline[s] for s in seeds]
    low, high = bootstrap_interval(differences)
    return PairedDifference(
        mean=statistics.fmean(differences),
        low=low,
        high=high,
        positive=sum(d > 0 for d in differences),
        negative=sum(d < 0 for d in differences),
        seeds=len(seeds),
    )
