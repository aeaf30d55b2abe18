"""The data-generation layer: backends behind one `Generator` interface, jobs (sample, rollout, signals, rank,
pairs) writing sharded, resumable stores, and readers for what they wrote.

    from align_distill.data_gen import run_job, load_store, load_signals
    run_job("sample", {"input": "prompts.jsonl", "output_dir": "out/samples", "model": "out/teacher", "n": 4})
    samples = load_store("out/samples")          # a datasets.Dataset in input order
"""

from .backends import Generator, SamplingParams, make_generator
from .config import ConfigError, load_config
from .jobs import load_signals, run_job, run_pairs, run_rank, run_rollout, run_sample, run_signals
from .store import FingerprintMismatch, StoreError, load_store

__all__ = [
    "ConfigError",
    "FingerprintMismatch",
    "Generator",
    "SamplingParams",
    "StoreError",
    "load_config",
    "load_signals",
    "load_store",
    "make_generator",
    "run_job",
    "run_pairs",
    "run_rank",
    "run_rollout",
    "run_sample",
    "run_signals",
]
