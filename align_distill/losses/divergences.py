"""The per-token divergence family of `kd_loss` and `topk_kd_loss` (docs/methods/kd.md), on log-probability rows.

Every divergence here takes the student's and the teacher's normalised log-probabilities `[n, V]` (or the
(K+1)-bin distributions of the top-k cache) and returns one value per row `[n]`. Working on log-probabilities,
not logits, is what lets the full-vocabulary and the top-k losses share one definition. No chunking here: the
callers run these functions inside `chunked_token_map`, one chunk of rows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

Divergence = Literal[
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "tvdpp", "akl", "taid"
]

# The parameters each divergence takes and their defaults (None: required). All of them lie in [0, 1].
DIVERGENCE_PARAMS: dict[str, dict[str, float | None]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.5},
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "tvd": {},
    "tvdpp": {},  # TVD++ (Goel et al. 2024): value TVD, gradient the reward-normalised policy gradient of TVD
    "akl": {"mu": 0.5},
    "taid": {"taid_t": None},  # scheduled by the trainer (TAID raises t towards 1): no sensible constant default
}


def _describe(divergence: str) -> str:
    params = DIVERGENCE_PARAMS[divergence]
    if not params:
        return f"{divergence} (no parameters)"
    parts = [name if default is None else f"{name}={default}" for name, default in params.items()]
    return f"{divergence} ({', '.join(parts)})"


def divergence_params(divergence: str, params: Mapping[str, float]) -> dict[str, float]:
    """Check `params` against `divergence` and fill in the defaults; a clear ValueError for anything else.

    Raised for an unknown divergence, a parameter the divergence does not take, a missing required parameter
    (`taid_t`) and a value outside [0, 1]. Errors name the divergence and the parameters it takes.
    """
    if divergence not in DIVERGENCE_PARAMS:
        known = ", ".join(_describe(name) for name in DIVERGENCE_PARAMS)
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {known}")
    allowed = DIVERGENCE_PARAMS[divergence]
    unexpected = sorted(set(params) - set(allowed))
    if unexpected:
        takers = ", ".join(_describe(name) for name, taken in DIVERGENCE_PARAMS.items() if taken)
        raise ValueError(
            f"divergence {_describe(divergence)} does not take {', '.join(unexpected)}; parameters by divergence: "
            f"{takers}"
        )
    resolved = {**allowed, **params}
    missing = [name for name, value in resolved.items() if value is None]
    if missing:
        raise ValueError(f"divergence {_describe(divergence)} needs {', '.join(missing)}, a value in [0, 1]")
    for name, value in resolved.items():
        if not 0.0 <= float(value) <= 1.0:  # NaN fails too
            raise ValueError(f"{divergence} {name} must lie in [0, 1], found {value}")
    return {name: float(value) for name, value in resolved.items()}


def finite(log_probs: torch.Tensor) -> torch.Tensor:
    """-inf (zero probability) → the dtype's lowest value: exp gives 0 and 0·(finite) = 0, so no NaN forward or back.

    One clamp is cheaper than guarding every product with `where`; NaN still propagates.
    """
    return log_probs.clamp(min=torch.finfo(log_probs.dtype).min)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim from finite log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1 − w)·b) for 0 < w < 1, stably in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _akl(log_q: torch.Tensor, log_p: torch.Tensor, mu: float) -> torch.Tensor:
    """Adaptive KL (Wu et al. 2024): forward and reverse KL weighted by the detached head and tail gaps.

    The head is the shortest prefix of the teacher's tokens sorted by p (descending) whose cumulative p reaches
    `mu`, the crossing token included; `mu = 1` puts every token in the head (rounding of the cumulative sum
    must not push the last tokens out), `mu = 0` leaves it empty.
    """
    p, q = log_p.exp(), log_q.exp()
    if mu >= 1.0:
        head = torch.ones_like(p, dtype=torch.bool)
    else:
        sorted_p, order = p.detach().sort(dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each sorted token
        head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, before < mu)
    gap = (p - q).abs().detach()
    g_head = torch.where(head, gap, 0.0).sum(-1)
    g_tail = torch.where(head, 0.0, gap).sum(-1)
    total = g_head + g_tail
    mixed = (g_head * kl(log_p, log_q) + g_tail * kl(log_q, log_p)) / torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, mixed, 0.0)


def _tvdpp(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """TVD++ (Goel et al. 2024, docs/methods/speculative.md): the value is TVD, the gradient is TVD's policy gradient
    with the reward normalised over the student's own distribution at each position.

    ∇TVD = −E_{v~q}[r(v)·∇log q(v)] with r(v) = 1{p(v) > q(v)}; TVD++ uses r̃ = (r − μ)/σ, μ = E_q[r],
    σ² = Var_q[r] = μ(1 − μ) (r is 0/1), so ∇TVD++ = −Σ_v q(v)·r̃(v)·∇log q(v) = ∇TVD / σ per position (the
    baseline μ cancels in the exact sum over the vocabulary; 1/σ is what changes). σ = 0 (q entirely on one side of
    p) gives zero gradient, as the TVD gradient is then zero too. The surrogate −Σ q·stopgrad(r̃) is zero at the
    current q, so its value is replaced by the (detached) TVD: logged losses stay comparable with `tvd`.
    """
    p, q = log_p.exp(), log_q.exp()
    tvd = 0.5 * (p - q).abs().sum(-1)
    with torch.no_grad():
        reward = (p > q).to(q.dtype)
        mean = (q * reward).sum(-1, keepdim=True)
        std = (mean * (1 - mean)).clamp(min=0).sqrt()
        normalised = torch.where(std > 0, (reward - mean) / torch.where(std > 0, std, 1.0), 0.0)
    surrogate = -(q * normalised).sum(-1)
    return tvd.detach() + (surrogate - surrogate.detach())


def divergence_from_logprobs(
    log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, params: Mapping[str, float]
) -> torch.Tensor:
    """Divergence `[n]` between student `log_q` and teacher `log_p`, normalised log-probabilities `[n, V]`.

    `params` as returned by `divergence_params` (checked, defaults filled). Zero-probability entries may be -inf.
    With p = teacher, q = student:
    - `forward_kl` KL(p ‖ q); `reverse_kl` KL(q ‖ p);
    - `jsd` (GKD, TRL's generalized JSD): m = (1 − β)·q + β·p, β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), β = 0 → forward,
      β = 1 → reverse KL;
    - `skew_forward_kl` KL(p ‖ α·p + (1 − α)·q), `skew_reverse_kl` KL(q ‖ α·q + (1 − α)·p) (DistiLLM);
    - `tvd` ½·Σ|p − q|; `tvdpp` the same value with the TVD++ gradient (`_tvdpp`);
    - `akl` adaptive KL (`_akl`);
    - `taid` KL(r ‖ q) with r = softmax((1 − t)·stopgrad(log q) + t·log p) (TAID; the same softmax as on the
      logits, since log-probabilities differ from logits by one constant per row).
    """
    log_q, log_p = finite(log_q), finite(log_p)
    if divergence == "forward_kl":
        return kl(log_p, log_q)
    if divergence == "reverse_kl":
        return kl(log_q, log_p)
    if divergence == "jsd":
        beta = params["beta"]
        if beta == 0.0:
            return kl(log_p, log_q)
        if beta == 1.0:
            return kl(log_q, log_p)
        log_m = _mix(log_p, log_q, beta)
        return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        alpha = params["alpha"]
        first, second = (log_p, log_q) if divergence == "skew_forward_kl" else (log_q, log_p)
        if alpha == 0.0:
            return kl(first, second)
        if alpha == 1.0:  # the mixture is `first` itself: exactly 0 (and no log(0) of the unused weight)
            return kl(first, first)
        return kl(first, _mix(first, second, alpha))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "tvdpp":
        return _tvdpp(log_q, log_p)
    if divergence == "akl":
        return _akl(log_q, log_p, params["mu"])
    if divergence == "taid":
        t = params["taid_t"]
        log_r = finite(torch.log_softmax((1 - t) * log_q.detach() + t * log_p, dim=-1))
        return kl(log_r, log_q)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCE_PARAMS)}")
