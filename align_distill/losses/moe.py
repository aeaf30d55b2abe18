"""Load-balancing (auxiliary) loss of a sparse MoE student (LLaVA-MoD, docs/methods/llava_mod.md §3.2).

Per MoE layer, over S tokens with gate probabilities g_s = softmax(router logits h_s) ∈ Δ^E:
m_e = mean_s g_{s,e} and c_e = fraction of tokens whose *first* choice is e; ℓ_aux = E · Σ_e m_e c_e (1 for
perfectly uniform routing). The model-level loss is Σ over MoE layers (the caller multiplies by the coefficient,
0.01 by default). This is DeepSpeed's top-2 gate, which LLaVA-MoD's official code runs.

transformers' `load_balancing_loss_func` (Mixtral, Qwen2-MoE, Qwen3-MoE; returned as `aux_loss` by
`model(..., output_router_logits=True)` and added into `loss` times `router_aux_loss_coef` when labels are given)
differs in two ways: c_e counts *all* top-k choices (so uniform routing gives k, not 1), and m, c are pooled over
all layers' tokens before the product instead of computing ℓ per layer and summing. `convention="transformers"`
reproduces it exactly; the two coincide for k = 1 and a single MoE layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

BalancingConvention = Literal["deepspeed", "transformers"]


def _as_layers(router_logits: torch.Tensor | Sequence[torch.Tensor], num_experts: int) -> list[torch.Tensor]:
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers:
        raise ValueError("moe_balancing_loss needs router logits of at least one MoE layer; got none")
    flat = []
    for index, logits in enumerate(layers):
        if logits.shape[-1] != num_experts:
            raise ValueError(
                f"router logits of MoE layer {index} have {logits.shape[-1]} experts in the last dim "
                f"(shape {tuple(logits.shape)}); expected num_experts={num_experts}"
            )
        flat.append(logits.reshape(-1, num_experts))
    return flat


def moe_balancing_loss(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    top_k: int,
    num_experts: int,
    attention_mask: torch.Tensor | None = None,
    convention: BalancingConvention = "deepspeed",
) -> torch.Tensor:
    """Unscaled load-balancing loss (multiply by the aux coefficient yourself).

    `router_logits`: one tensor `[S, E]` / `[B, T, E]`, or one per MoE layer (the `router_logits` tuple a
    transformers MoE model returns with `output_router_logits=True`, each `[B*T, E]`).
    `attention_mask`: optional `[B, T]`; when given only its tokens count (LLaVA-MoD's code counts padding too,
    which is what `None` does). `top_k` only matters for `convention="transformers"`: the method page's (DeepSpeed)
    loss counts first choices only, whatever k the router uses.
    """
    if convention not in ("deepspeed", "transformers"):
        raise ValueError(f"unknown convention {convention!r}; expected 'deepspeed' or 'transformers'")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}]; got {top_k}")
    layers = _as_layers(router_logits, num_experts)
    weights = None
    if attention_mask is not None:
        weights = attention_mask.reshape(-1)
        for index, logits in enumerate(layers):
            if logits.shape[0] != weights.shape[0]:
                raise ValueError(
                    f"router logits of MoE layer {index} cover {logits.shape[0]} tokens but attention_mask "
                    f"{tuple(attention_mask.shape)} covers {weights.shape[0]}"
                )

    prob_sums, count_sums, token_total = [], [], []
    for logits in layers:
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        chosen = torch.topk(probs, top_k if convention == "transformers" else 1, dim=-1).indices
        # [S, E] indicator of each token's counted choices; routing is discrete, so no gradient flows through it
        counts = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
        w = weights.to(probs) if weights is not None else probs.new_ones(probs.shape[0])
        prob_sums.append((probs * w[:, None]).sum(dim=0))
        count_sums.append((counts * w[:, None]).sum(dim=0))
        token_total.append(w.sum())

    if convention == "deepspeed":
        per_layer = [
            num_experts * torch.sum((p / n.clamp(min=1.0)) * (c / n.clamp(min=1.0)))
            for p, c, n in zip(prob_sums, count_sums, token_total)
        ]
        return torch.stack(per_layer).sum()
    n = torch.stack(token_total).sum().clamp(min=1.0)
    m = torch.stack(prob_sums).sum(dim=0) / n
    c = torch.stack(count_sums).sum(dim=0) / n
    return num_experts * torch.sum(m * c)
