"""CycleAlign: a white-box model learns from a black-box ranker over cycles (docs/methods/cyclealign.md).

- `config`: `CycleAlignConfig`;
- `trainer`: `CycleAlignTrainer`, one cycle's PRO training step;
- `judges`: the black box (in-context ranking prompt with demonstrations, the noisy oracle);
- `agreement`: the agreement ranking of the two rankings and one cycle's ranking summary;
- `loop`: `CycleAlign`, the cycles themselves (sample, rank twice, agree, train), resumable.
"""

from .agreement import agreement_ranking, kendall_tau, rank_agreement
from .config import CycleAlignConfig
from .loop import CycleAlign, cycle_prompts
from .trainer import CycleAlignTrainer, RankedCandidatesCollator, tokenize_ranked

__all__ = [
    "CycleAlign",
    "CycleAlignConfig",
    "CycleAlignTrainer",
    "RankedCandidatesCollator",
    "agreement_ranking",
    "cycle_prompts",
    "kendall_tau",
    "rank_agreement",
    "tokenize_ranked",
]
