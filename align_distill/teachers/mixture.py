"""Several teachers as one: a weighted mixture of their top-k distributions, or a route per row (docs/teachers.md,
"Several teachers").

Mixture (`mix_topk`), per response position, for teachers i = 1..n with weights w_i (normalised to Σ w_i = 1),
top-k id sets S_i and probabilities p_i(v) = exp(logprob) for v ∈ S_i:

    U = ∪_i S_i,   m(v) = Σ_i w_i · p_i(v) · [v ∈ S_i],   Z = Σ_{v ∈ U} m(v) = Σ_i w_i · (1 − r_i),
    q(v) = m(v) / Z  for v ∈ U          (r_i = 1 − Σ_{v ∈ S_i} p_i(v), teacher i's mass outside its top-k)

Each teacher's mass outside its own top-k (r_i) is not known per id, so it is dropped and the union renormalised:
q sums to 1 over U, and the top-k losses see an empty rest bucket. The log-prob of the actual token y is the exact
mixture log Σ_i w_i · p_i(y), since every source knows each teacher's p_i(y) whether or not y is in its top-k.
The result has K_u = Σ_i K_i slots; slots past |U| hold distinct ids above every real id with log-prob −inf (no
mass), which the top-k losses read as empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .signals import BatchSignals


def mix_topk(signals: Sequence[BatchSignals], weights: Sequence[float]) -> BatchSignals:
    """The renormalised union mixture of `signals` (each `[N, T, K_i]` ids / log-probs, `[N, T]` token log-probs)
    with `weights` (≥ 0, not all 0; normalised here). Returns `[N, T, Σ K_i]` signals (see the module docstring)."""
    if len(signals) != len(weights) or not signals:
        raise ValueError(f"{len(signals)} teachers' signals for {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mixture weights must be >= 0 and not all 0, found {list(weights)}")
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    ids = torch.cat([s.ids.long() for s in signals], dim=-1)
    probs = torch.cat([wi * s.logprobs.float().exp() for wi, s in zip(w, signals)], dim=-1)
    ids, order = ids.sort(dim=-1)
    probs = probs.gather(-1, order)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    group = first.long().cumsum(-1) - 1  # slot of each id's union entry
    mass = torch.zeros_like(probs).scatter_add_(-1, group, probs)
    slots = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    used = slots < first.sum(-1, keepdim=True)
    padding = (ids.max() + 1 if ids.numel() else 0) + slots  # distinct ids that no teacher returned
    # every entry of a group holds the same id, so the group's minimum is that id
    union = torch.full_like(ids, torch.iinfo(torch.long).max).scatter_reduce(-1, group, ids, reduce="amin")
    union = torch.where(used, union, padding)
    norm = mass.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    logprobs = torch.where(used, (mass / norm).log(), float("-inf"))
    token = torch.stack([wi * s.token_logprobs.float().exp() for wi, s in zip(w, signals)]).sum(0).log()
    return BatchSignals(ids=union, logprobs=logprobs, token_logprobs=token)


def pad_topk(signals: BatchSignals, width: int) -> BatchSignals:
    """`signals` widened to `width` slots: extra slots hold distinct unused ids with log-prob −inf (no mass)."""
    k = signals.ids.shape[-1]
    if k >= width:
        return signals
    shape = (*signals.ids.shape[:-1], width - k)
    top = int(signals.ids.max()) + 1 if signals.ids.numel() else 0
    extra = top + torch.arange(width - k, device=signals.ids.device).expand(shape)
    return BatchSignals(
        ids=torch.cat([signals.ids.long(), extra], dim=-1),
        logprobs=torch.cat([signals.logprobs, signals.logprobs.new_full(shape, float("-inf"))], dim=-1),
        token_logprobs=signals.token_logprobs,
    )
