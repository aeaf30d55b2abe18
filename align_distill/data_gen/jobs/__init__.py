"""The data-generation jobs, each a function of its config (a dataclass, a dict of keys or a YAML path) that
writes a resumable store and returns its folder: `run_job("signals", "signals.yaml")`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from align_distill.data_gen.config import CONFIGS, ConfigError, JobConfig

from .pairs import preference_pairs, run_pairs
from .rank import run_rank
from .runner import row_seed
from .sample import run_rollout, run_sample
from .signals import run_signals
from .teacher_signals import SignalsCache, SignalsEncoding, load_signals, measured_bytes_per_token

JOBS: dict[str, Callable[..., Path]] = {
    "sample": run_sample,
    "rollout": run_rollout,
    "signals": run_signals,
    "rank": run_rank,
    "pairs": run_pairs,
}
assert set(JOBS) == set(CONFIGS)


def run_job(kind: str, config: JobConfig | dict[str, Any] | str | Path) -> Path:
    """Run the `kind` job ("sample", "rollout", "signals", "rank", "pairs") and return its store folder."""
    if kind not in JOBS:
        raise ConfigError(f"unknown job {kind!r}; expected one of {', '.join(JOBS)}")
    return JOBS[kind](config)


__all__ = [
    "JOBS",
    "SignalsCache",
    "SignalsEncoding",
    "load_signals",
    "measured_bytes_per_token",
    "preference_pairs",
    "row_seed",
    "run_job",
    "run_pairs",
    "run_rank",
    "run_rollout",
    "run_sample",
    "run_signals",
]
