"""Block efficiency: the expected tokens per target call of speculative decoding (docs/methods/speculative.md)."""

from __future__ import annotations


def block_efficiency(alpha: float, gamma: int) -> float:
    """E[tokens per target call] = (1 − α^(γ+1)) / (1 − α) with γ drafted tokens per call (Leviathan et al. 2023).

    Assumes every drafted token is accepted independently with the same probability α (the i.i.d. assumption);
    α = 1 gives the limit γ + 1, α = 0 gives 1 (the target's own token). Measured values come from
    `SpeculativeStats.block_efficiency` of real runs.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], found {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be a number of drafted tokens ≥ 0, found {gamma}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
