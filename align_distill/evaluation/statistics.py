"""Percentile bootstrap intervals: of a mean, of a paired difference, and of any statistic of resampled rows.

One implementation for the whole project: `bench/stats.py` (differences paired by seed) and `align-distill evaluate`
(means and win-rates over prompts, differences paired by prompt) both use it.

The resampling stream is Python's `random.Random(seed).choices` (index = floor(u · n) for each uniform u of the
Mersenne Twister), drawn in bulk with numpy from the same generator state: the intervals equal those of the plain
loop `sorted(fmean(rng.choices(values, k=n)) for _ in range(resamples))` up to float rounding (so the reproductions'
intervals are unchanged), about three times faster (500 prompts × 10,000 resamples: 0.17 s instead of 0.54 s on a
shared 2-core CPU).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
_CHUNK = 2**22  # uniforms drawn at once (32 MiB of float64), so memory stays bounded for long inputs


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values, q in [0, 1]."""
    position = q * (len(sorted_values) - 1)
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, n] row indices drawn with replacement: row r is the r-th `random.Random(seed).choices` draw of
    k=n positions (see the module docstring)."""
    if n < 1:
        raise ValueError("resample_indices: no values")
    state = random.Random(seed).getstate()[1]
    generator = np.random.RandomState()
    generator.set_state(("MT19937", np.asarray(state[:-1], dtype=np.uint32), state[-1]))
    total = resamples * n
    uniforms = np.concatenate(
        [generator.random_sample(min(_CHUNK, total - start)) for start in range(0, total, _CHUNK)] or [np.empty(0)]
    )
    return np.floor(uniforms * float(n)).astype(np.int64).reshape(resamples, n)


def bootstrap_statistics(
    n: int, statistic: Callable[[np.ndarray], float], resamples: int = RESAMPLES, seed: int = 0
) -> np.ndarray:
    """`statistic(indices)` for each bootstrap resample of n rows, sorted (for statistics that are not a plain mean,
    e.g. the length-controlled win-rate refitted on each resample)."""
    indices = resample_indices(n, resamples, seed)
    return np.sort(np.array([statistic(row) for row in indices], dtype=float))


def bootstrap_interval(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval (95 % by default) of the mean of `values` (fixed seed: same data, same
    interval)."""
    if len(values) == 0:
        raise ValueError("bootstrap_interval: no values")
    array = np.asarray(values, dtype=float)
    means = np.sort(array[resample_indices(len(array), resamples, seed)].mean(axis=1))
    tail = (1 - level) / 2
    return float(percentile(means, tail)), float(percentile(means, 1 - tail))


@dataclass(frozen=True)
class MeanInterval:
    """A mean with its bootstrap interval, over `n` rows."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_interval(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> MeanInterval:
    """The mean of `values` (summed in order, as `sum(values) / n`) with its 95 % bootstrap interval."""
    low, high = bootstrap_interval(values, resamples, seed)
    return MeanInterval(mean=sum(values) / len(values), low=low, high=high, n=len(values))


@dataclass(frozen=True)
class PairedDifference:
    """method − baseline over paired units (seeds, or prompts both answered)."""

    mean: float
    low: float  # 2.5 % percentile of the bootstrap distribution of the mean
    high: float  # 97.5 %
    positive: int  # units where method > baseline
    negative: int
    seeds: int  # paired units (named after the reproductions' unit, the seed)

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


def paired_difference(
    method: Mapping[Any, float], baseline: Mapping[Any, float], resamples: int = RESAMPLES, seed: int = 0
) -> PairedDifference:
    """Compare two {unit: value} maps (unit: a seed, a prompt id) on the units both have."""
    units = sorted(set(method) & set(baseline))
    if not units:
        raise ValueError("paired_difference: the two methods share no seed (no common unit)")
    differences = [method[u] - baseline[u] for u in units]
    low, high = bootstrap_interval(differences, resamples, seed)
    return PairedDifference(
        mean=statistics.fmean(differences),
        low=low,
        high=high,
        positive=sum(d > 0 for d in differences),
        negative=sum(d < 0 for d in differences),
        seeds=len(units),
    )
