"""Empirical epsilon lower bounds from one training run with m canaries (pure functions).

Each canary is included independently with probability 1/2; after training the auditor
guesses "in" or "out" for ``r`` of them and ``v`` guesses are right. An (epsilon, delta)-DP run
makes ``v`` hard to reach, so a large ``v`` rejects that epsilon:

- :func:`one_run_epsilon`: Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training
  Run" (NeurIPS 2023, arXiv 2305.08846), Theorem 3.1 with delta;
- :func:`one_run_epsilon_fdp`: Mahloujifar, Melis, Chaudhuri, "Auditing f-DP in one run"
  (arXiv 2410.22235), the same guesses tested against the Gaussian mechanism's trade-off
  curve (tighter when the run is a Gaussian mechanism, as DP-SGD is);
- :func:`ceiling`: the largest bound m canaries can ever show (every guess right), about
  ln(m/3) at 95 %: a bound is informative only well below it.

Every bound is a *lower* bound at the given confidence, never an estimate of the true epsilon;
the accountant's epsilon stays the guarantee. Reference: google-deepmind/jax_privacy
``jax_privacy/auditing.py`` (``_one_run_p_value``, ``_epsilon_one_run_fdp``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import optimize, special, stats

#: The audit's confidence: a bound is the largest epsilon rejected at this level.
SIGNIFICANCE = 0.05
#: Largest epsilon the bisection considers (m canaries cannot show more than ~ln(m/3)).
EPSILON_MAX = 100.0


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m = {m}, r = {r}, v = {v}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta = {delta!r} is invalid: must be in [0, 1)")


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses right] under (epsilon, delta)-DP, Steinke et al.'s
    bound: f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i, with f(v) = P[Binomial(r,
    e^eps / (1 + e^eps)) >= v], capped at 1."""
    _check(m, r, v, delta)
    p = float(special.expit(epsilon))
    f_v = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(f_v, 1.0)
    i = np.arange(1, v + 1)
    gap = np.max((stats.binom.sf(v - i - 1, r, p) - f_v) / i)
    return min(f_v + 2 * m * delta * float(gap), 1.0)


def _largest_rejected(rejects: Callable[[float], bool]) -> float:
    """The largest epsilon in [0, EPSILON_MAX] that ``rejects`` (monotone: true up to a point)."""
    if not rejects(0.0):
        return 0.0
    if rejects(EPSILON_MAX):
        return EPSILON_MAX
    lo, hi = 0.0, EPSILON_MAX
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


def one_run_epsilon(
    *, m: int, r: int, v: int, delta: float, significance: float = SIGNIFICANCE
) -> float:
    """The largest epsilon that ``v`` right of ``r`` guesses on ``m`` canaries reject at
    ``significance`` (Steinke et al.); 0 when even epsilon 0 is not rejected."""
    _check(m, r, v, delta)
    return _largest_rejected(
        lambda eps: one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) <= significance
    )


def gaussian_sigma(epsilon: float, delta: float) -> float:
    """Noise multiplier (sensitivity 1) of the Gaussian mechanism that is exactly
    (epsilon, delta)-DP (Balle and Wang 2018, analytic Gaussian mechanism)."""
    if not (epsilon >= 0 and 0 < delta < 1):
        raise ValueError(f"need epsilon >= 0 and 0 < delta < 1, got {epsilon}, {delta}")

    def excess(log_sigma: float) -> float:
        s = math.exp(log_sigma)
        a, b = 1 / (2 * s), epsilon * s
        # delta(eps) of N(0, s^2) vs N(1, s^2), in log space to stay finite at large eps
        d = stats.norm.cdf(a - b) - math.exp(epsilon + stats.norm.logcdf(-a - b))
        return d - delta

    return math.exp(optimize.brentq(excess, -20.0, 20.0, xtol=1e-12))


def one_run_epsilon_fdp(
    *, m: int, r: int, v: int, delta: float, significance: float = SIGNIFICANCE
) -> float:
    """The largest epsilon at which the Gaussian mechanism calibrated to (epsilon, delta) is
    rejected by ``v`` right of ``r`` guesses on ``m`` canaries (Mahloujifar et al., the
    recursion of their Algorithm "audit with cap"); 0 when none is."""
    _check(m, r, v, delta)
    if r == 0 or v == 0:
        return 0.0

    def rejects(eps: float) -> bool:
        mu = 1 / gaussian_sigma(eps, delta)
        right, wrong = significance * v / m, significance * (r - v) / m
        for i in range(v - 1, -1, -1):
            # the smallest mass of wrong guesses the trade-off curve allows beside `right`
            floor = max(wrong, float(stats.norm.cdf(stats.norm.ppf(right) - mu)))
            if floor == wrong:
                break
            right = min(right + i / (r - i) * (floor - wrong), 1.0)
            wrong = floor
        return right + wrong > r / m

    return _largest_rejected(rejects)


def ceiling(*, m: int, delta: float, significance: float = SIGNIFICANCE) -> float:
    """The largest Steinke bound ``m`` canaries can show: every one guessed, all right."""
    return one_run_epsilon(m=m, r=m, v=m, delta=delta, significance=significance)
