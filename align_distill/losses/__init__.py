"""Pure tensor losses of every method (no trainer state). See each module's docstring for shapes.

Names are resolved lazily so that `import align_distill.losses` stays cheap and each module stays independent.
"""

import importlib
from typing import Any

_EXPORTS = {
    # chunked full-vocabulary machinery, shared by every full-vocabulary loss
    "kd_loss": "divergence",
    "token_divergence": "divergence",
    "chunked_token_map": "divergence",
    # the divergence family on log-probability rows (docs/methods/kd.md), shared by kd_loss and topk_kd_loss
    "divergence_from_logprobs": "divergences",
    "divergence_params": "divergences",
    "DIVERGENCE_PARAMS": "divergences",
    # DCKD / ADPA (docs/methods/dckd_adpa.md)
    "topk_kd_loss": "topk",
    "adpa_advantages": "adpa",
    "adpa_loss": "adpa",
    # AlignDistil (docs/methods/aligndistil.md)
    "aligndistil_teacher": "aligndistil",
    "aligndistil_loss": "aligndistil",
    "aligndistil_stats": "aligndistil",
    # LLaVA-MoD (docs/methods/llava_mod.md)
    "teacher_ref_preference_loss": "preference",
    "moe_balancing_loss": "moe",
    # CycleAlign (docs/methods/cyclealign.md)
    "pro_loss": "ranking",
    # speculative decoding: the draft's acceptance rate (docs/methods/speculative.md)
    "acceptance_rate": "acceptance",
    "topk_acceptance_bounds": "acceptance",
    # fused LM-head forms: from hidden states and head weights, no [B, T, V] logits (docs/performance.md)
    "fused_kd_loss": "fused",
    "fused_topk_kd_loss": "fused",
    "fused_adpa_loss": "fused",
    "fused_aligndistil_loss": "fused",
    "fused_token_nll": "fused",
    # shared helpers
    "masked_mean": "reduction",
    "sequence_logps": "reduction",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'align_distill.losses' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return getattr(module, name)
