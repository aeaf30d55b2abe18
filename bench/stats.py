"""Paired comparisons over seeds: mean difference, a bootstrap 95 % interval, and how many seeds favour each side.

A method and its baseline are trained from the same SFT student with the same data for each seed, so their results
are paired by seed; the seed-to-seed spread (different tiny models and data) cancels in the difference. The
statistics live in the package (`align_distill.evaluation.statistics`, also used by `align-distill evaluate`).
"""

from __future__ import annotations

from align_distill.evaluation.statistics import (
    RESAMPLES,
    PairedDifference,
    bootstrap_interval,
    paired_difference,
    percentile,
)

__all__ = ["RESAMPLES", "PairedDifference", "bootstrap_interval", "paired_difference", "percentile"]
