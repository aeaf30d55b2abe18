"""The length-controlled win-rate recovers a planted length bias: verdicts drawn from σ(θ + φ·tanh(Δ/s)) give back
θ and φ, and the LC win-rate σ(θ), while the raw win-rate is pulled by the length difference."""

import numpy as np
import pytest

from align_distill.evaluation.length_control import fit_logistic, length_controlled_win_rate, length_feature


def planted(theta: float, phi: float, n: int, shift: float, seed: int = 0):
    """Length differences centred on `shift` characters and verdicts from the planted model; ties where a second
    draw disagrees (the two orders), as the evaluation makes them."""
    rng = np.random.default_rng(seed)
    delta = rng.normal(shift, 60.0, n)
    x = length_feature(delta)
    p = 1 / (1 + np.exp(-(theta + phi * x)))
    first, second = rng.random(n) < p, rng.random(n) < p
    return np.where(first == second, first.astype(float), 0.5), delta


def test_a_planted_length_bias_is_recovered():
    preferences, delta = planted(theta=0.0, phi=2.0, n=4000, shift=40.0)
    assert preferences.mean() > 0.6  # longer answers win more: the raw win-rate is inflated
    result = length_controlled_win_rate(preferences, delta, resamples=300)
    assert result.phi == pytest.approx(2.0, abs=0.25)
    assert result.theta == pytest.approx(0.0, abs=0.12)
    assert result.win_rate == pytest.approx(0.5, abs=0.03) and result.low < 0.5 < result.high


def test_without_a_length_effect_lc_equals_the_raw_win_rate():
    preferences, delta = planted(theta=0.8, phi=0.0, n=3000, shift=0.0, seed=1)
    result = length_controlled_win_rate(preferences, delta, resamples=200)
    assert abs(result.phi) < 0.2 and result.win_rate == pytest.approx(preferences.mean(), abs=0.02)


def test_ties_enter_as_half_a_win_and_a_one_sided_sample_stays_finite():
    theta, phi = fit_logistic(np.zeros(4), np.full(4, 0.5))  # all ties: σ(θ) = 0.5
    assert theta == pytest.approx(0.0, abs=1e-9)
    result = length_controlled_win_rate([1.0] * 6, [10, 20, 30, 40, 50, 60], resamples=50)
    assert np.isfinite(result.theta) and 0.9 < result.win_rate < 1.0  # the ridge keeps a sweep finite
