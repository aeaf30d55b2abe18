"""Draft models for speculative decoding: acceptance rates, block efficiency and a reference speculative sampler
(docs/methods/speculative.md). Draft training itself is the `kd` method (recipes `configs/kd/draft_*.yaml`)."""

from align_distill.losses.acceptance import acceptance_rate, topk_acceptance_bounds

from .metrics import block_efficiency
from .sampler import SpeculativeStats, causal_lm, speculative_sample

__all__ = [
    "SpeculativeStats",
    "acceptance_rate",
    "block_efficiency",
    "causal_lm",
    "speculative_sample",
    "topk_acceptance_bounds",
]
