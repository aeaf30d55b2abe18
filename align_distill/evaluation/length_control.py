"""The length-controlled win-rate, as AlpacaEval 2's LC win-rate: what the win-rate would be if the model's answers
were as long as the baseline's.

The model (for one model against the baseline, over the prompts both answered and the judge could read):

    P(model preferred on prompt i) = σ(θ + φ · x_i),   x_i = tanh(Δ_i / s)

with Δ_i = characters of the model's answer − characters of the baseline's, and s the standard deviation of Δ over
the prompts (s = 1 when every Δ is equal). Each prompt's preference y_i is 1 (the model wins in both orders), 0
(the baseline wins in both) or 0.5 (a tie: the two orders disagree); a tie enters the likelihood as half a win and
half a loss (soft labels, as AlpacaEval fits its [0, 1] preferences). θ and φ maximise

    Σ_i [y_i log p_i + (1 − y_i) log(1 − p_i)] − (λ / 2)(θ² + φ²),   λ = 1e-3,

by Newton's method; the small ridge λ keeps the fit finite when one side wins every prompt (the plain maximum
likelihood is then infinite). The LC win-rate is σ(θ), the fitted preference at zero length difference. AlpacaEval 2
adds an instruction-difficulty term fitted across many models; with one model against one baseline it is not
identifiable and is left out. Its interval refits θ and φ on each bootstrap resample of the prompts (the feature
scale s stays that of the full sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .statistics import LEVEL, RESAMPLES, percentile, resample_indices

RIDGE = 1e-3
_ITERATIONS = 100


def length_feature(length_differences: Sequence[float]) -> np.ndarray:
    """x_i = tanh(Δ_i / s), s the standard deviation of Δ (1 when it is 0)."""
    delta = np.asarray(length_differences, dtype=float)
    scale = float(delta.std()) if len(delta) > 1 else 0.0
    return np.tanh(delta / (scale if scale > 0 else 1.0))


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """(θ, φ) maximising the ridge-penalised soft-label log-likelihood of σ(θ + φ x) (see the module docstring).
    `x`, `y`: [..., n]; leading dimensions are independent fits (bootstrap resamples), solved together."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    theta = np.zeros(x.shape[:-1])
    phi = np.zeros(x.shape[:-1])
    for _ in range(_ITERATIONS):
        p = 1.0 / (1.0 + np.exp(-(theta[..., None] + phi[..., None] * x)))
        residual = y - p
        g_theta = residual.sum(-1) - ridge * theta
        g_phi = (residual * x).sum(-1) - ridge * phi
        w = p * (1.0 - p)
        h_tt = w.sum(-1) + ridge
        h_tp = (w * x).sum(-1)
        h_pp = (w * x * x).sum(-1) + ridge
        determinant = h_tt * h_pp - h_tp**2
        step_theta = (h_pp * g_theta - h_tp * g_phi) / determinant
        step_phi = (h_tt * g_phi - h_tp * g_theta) / determinant
        theta, phi = theta + step_theta, phi + step_phi
        if max(np.abs(step_theta).max(initial=0.0), np.abs(step_phi).max(initial=0.0)) < 1e-10:
            break
    return theta, phi


@dataclass(frozen=True)
class LengthControlled:
    """σ(θ) with its bootstrap interval, and the fitted coefficients (φ > 0: the judge favours longer answers)."""

    win_rate: float
    low: float
    high: float
    theta: float
    phi: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def length_controlled_win_rate(
    preferences: Sequence[float],
    length_differences: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> LengthControlled:
    """The LC win-rate of one model against the baseline (see the module docstring for the exact model)."""
    if len(preferences) != len(length_differences) or len(preferences) == 0:
        raise ValueError("length_controlled_win_rate: need one length difference per preference, and at least one")
    x, y = length_feature(length_differences), np.asarray(preferences, dtype=float)
    theta, phi = fit_logistic(x, y)
    indices = resample_indices(len(y), resamples, seed)
    chunk = max(1, 2**22 // len(y))  # resamples fitted together: bounded memory for long prompt sets
    theta_b = np.concatenate(
        [fit_logistic(x[rows], y[rows])[0] for rows in np.array_split(indices, -(-len(indices) // chunk))]
    )
    rates = np.sort(1.0 / (1.0 + np.exp(-theta_b)))
    tail = (1 - LEVEL) / 2
    return LengthControlled(
        win_rate=float(1.0 / (1.0 + np.exp(-theta))),
        low=float(percentile(rates, tail)),
        high=float(percentile(rates, 1 - tail)),
        theta=float(theta),
        phi=float(phi),
        n=len(y),
    )
