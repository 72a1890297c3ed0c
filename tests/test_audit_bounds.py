"""The one-run audit bounds against hand-computed binomial tails, the issue's ceilings and
dp-accounting's Gaussian calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privseg.privacy.audit_bounds import (
    ceiling,
    gaussian_sigma,
    one_run_epsilon,
    one_run_epsilon_fdp,
    one_run_p_value,
)


def _hand_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 3.1 of Steinke et al. term by term, with scipy's binomial tail."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(k: int) -> float:  # P[Binomial(r, q) >= k]
        return float(stats.binom.sf(k - 1, r, q))

    gap = max((f(v - i) - f(v)) / i for i in range(1, v + 1)) if v else 0.0
    return min(f(v) + 2 * m * delta * gap, 1.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (50, 50, 50, 1.0, 0.0),
        (200, 40, 35, 0.5, 1e-5),
        (1000, 100, 80, 2.0, 1e-3),
        (10, 4, 0, 1, 0),
    ],
)
def test_p_value_matches_the_binomial_tail_by_hand(m, r, v, eps, delta):
    got = one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta)
    assert got == pytest.approx(_hand_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_bound_is_the_largest_epsilon_rejected_at_95_percent():
    eps = one_run_epsilon(m=1000, r=100, v=90, delta=1e-5)
    assert eps > 0
    assert _hand_p_value(1000, 100, 90, eps - 1e-3, 1e-5) <= 0.05
    assert _hand_p_value(1000, 100, 90, eps + 1e-3, 1e-5) > 0.05


def test_chance_guessing_rejects_nothing():
    assert one_run_epsilon(m=200, r=100, v=50, delta=1e-5) == 0.0
    assert one_run_epsilon_fdp(m=200, r=100, v=50, delta=1e-5) == 0.0


@pytest.mark.parametrize(("m", "expected"), [(50, 2.8), (200, 4.2), (1000, 5.8)])
def test_ceiling_matches_the_issue(m, expected):
    got = ceiling(m=m, delta=1e-5)
    assert got == pytest.approx(expected, abs=0.05)
    assert got == pytest.approx(math.log(m / 3), abs=0.05)  # ln(r / ln 20) ~ ln(r / 3)


def test_gaussian_sigma_matches_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    for eps, delta in [(0.5, 1e-5), (2.0, 1e-5), (8.0, 1e-6)]:
        assert gaussian_sigma(eps, delta) == pytest.approx(
            dp_accounting.get_sigma_gaussian(eps, delta), rel=1e-4
        )


def test_fdp_is_at_least_as_tight_as_steinke_on_perfect_guesses():
    assert one_run_epsilon_fdp(m=200, r=200, v=200, delta=1e-5) > ceiling(m=200, delta=1e-5)


def test_bounds_stay_below_the_true_epsilon_of_a_gaussian_mechanism():
    """Validity: scores from an exactly (2, 1e-5)-DP Gaussian mechanism; the top 100 guessed
    "in". Each bound may exceed 2 with probability <= 5 %; on a fixed seed none does."""
    rng = np.random.default_rng(7)
    m, eps = 1000, 2.0
    sigma = gaussian_sigma(eps, 1e-5)
    for _ in range(3):
        inside = rng.random(m) < 0.5
        top = np.argsort(-(inside + sigma * rng.standard_normal(m)))[:100]
        v = int(inside[top].sum())
        assert one_run_epsilon(m=m, r=100, v=v, delta=1e-5) < eps
        assert one_run_epsilon_fdp(m=m, r=100, v=v, delta=1e-5) < eps


def test_invalid_counts_are_named():
    with pytest.raises(ValueError, match="v <= r <= m"):
        one_run_epsilon(m=10, r=20, v=5, delta=1e-5)
