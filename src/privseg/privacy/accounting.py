"""Pure privacy accounting: epsilon of a release history, and noise calibration.

No state lives here: the ledger stores releases and recomputes epsilon through these functions,
so the spent budget is always derived from the durable record, never from a running counter.
``privacy.accountant`` names an entry of :data:`privseg.core.plugins.ACCOUNTANTS` (Opacus's, loaded
on first use: importing this module does not import Opacus).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np

from privseg.core.errors import ConfigError
from privseg.core.plugins import ACCOUNTANTS

# Beyond this the update is noise; it also bounds the search (accounting at huge sigma is slow).
MAX_NOISE_MULTIPLIER = 200.0
#: Opacus's ``get_noise_multiplier`` search: start and largest sigma.
_SEARCH_START, _SEARCH_MAX = 10.0, 1e6

Release = tuple[float, float, int]


def _check_accountant(accountant: str) -> None:
    ACCOUNTANTS.check(accountant)


def _merge(history: Sequence[Release]) -> list[Release]:
    """Sum steps of identical (sigma, q) releases: composition is commutative, and PRV
    accounting cost grows with the number of distinct entries (one per round otherwise)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if n < 0:
            raise ValueError(f"a release cannot have negative steps ({n})")
        if n == 0:
            continue
        if sigma <= 0 and q > 0:
            return [(0.0, q, n)]  # unbounded: caught by the caller
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in steps.items()]


def epsilon(history: Sequence[Release], *, delta: float, accountant: str) -> float:
    """Epsilon spent by ``history`` = [(noise_multiplier, sample_rate, steps), ...] at ``delta``.

    Computed with Opacus's own accountant (same numbers as its ``PrivacyEngine``); noise 0 with
    data touched gives ``inf``.
    """
    _check_accountant(accountant)
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta = {delta!r} is invalid: allowed values are > 0 and < 1")
    merged = _merge(history)
    merged = [(s, q, n) for s, q, n in merged if q > 0]
    if not merged:
        return 0.0
    if any(s <= 0 for s, _, _ in merged):
        return math.inf
    return _epsilon(tuple(sorted(merged)), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon(merged: tuple[Release, ...], delta: float, accountant: str) -> float:
    """Pure, hence cached: a site asks for the same ledger's epsilon many times."""
    acc = ACCOUNTANTS.get(accountant)()
    acc.history = list(merged)
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q): -inf at q = 1, handled there
        return float(acc.get_epsilon(delta=delta))


def clear_cache() -> None:
    """Forget cached epsilons (benchmarks: each run must pay for its own accounting)."""
    _epsilon.cache_clear()


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: Sequence[Release] = (),
) -> float:
    """Smallest noise multiplier (to ~1%) whose epsilon after ``steps`` is <= target_epsilon.

    Calibrated once for the whole planned run (all rounds), never per round. With ``prior``
    releases the target is for their composition with the new steps (a resumed run, or what
    remains of a site's lifetime budget).
    """
    _check_accountant(accountant)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(
            f"privacy.target_epsilon = {target_epsilon!r} is invalid: must be positive and finite"
        )
    if steps <= 0:
        raise ConfigError(f"planned steps = {steps} is invalid: must be > 0 to calibrate noise")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate = {sample_rate!r} is invalid: must be in (0, 1]")
    with warnings.catch_warnings():
        # the RDP search probes huge sigmas where the largest alpha is optimal: not news
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if any(n > 0 for _, _, n in prior):
            return _calibrate_after(
                list(prior), target_epsilon, delta, sample_rate, steps, accountant
            )
        return _calibrate(target_epsilon, delta, sample_rate, steps, accountant)


def _calibrate_after(
    prior: list[Release],
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> float:
    """Bisection on log(sigma): epsilon(prior + new) decreases with the new release's sigma."""

    def eps(sigma: float) -> float:
        return epsilon([*prior, (sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    hi = MAX_NOISE_MULTIPLIER
    if eps(hi) > target_epsilon:
        raise ConfigError(
            f"epsilon {target_epsilon:.4g} is unreachable: the {len(prior)} earlier release(s) "
            f"already spend {epsilon(prior, delta=delta, accountant=accountant):.4g}, and even "
            f"noise multiplier {MAX_NOISE_MULTIPLIER:g} for {steps} more steps (sample rate "
            f"{sample_rate:.4g}) would pass it"
        )
    lo = 0.1
    while eps(lo) <= target_epsilon and lo > 1e-3:
        lo /= 4
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def _calibrate(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    floor = epsilon(
        [(MAX_NOISE_MULTIPLIER, sample_rate, steps)], delta=delta, accountant=accountant
    )
    if floor > target_epsilon:
        raise ConfigError(
            f"privacy.target_epsilon = {target_epsilon!r} is unreachable with delta={delta:g}, "
            f"sample rate {sample_rate:.4g} and {steps} steps: even noise multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} spends epsilon {floor:.4g}; raise the target or train "
            "fewer steps"
        )
    try:
        sigma = _noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as exc:
        raise ConfigError(
            f"privacy.target_epsilon = {target_epsilon!r} is unreachable with delta={delta:g}, "
            f"sample rate {sample_rate:.4g} and {steps} steps ({exc}); raise the target or "
            "train fewer steps"
        ) from exc
    # Opacus's search stops within tolerance of the target from below, but the PRV estimate is
    # recomputed here: make sure the value we report is really <= the target.
    for _ in range(60):
        eps = epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
        if eps <= target_epsilon:
            return sigma
        sigma *= 1.002
    raise ConfigError(
        f"privacy.target_epsilon = {target_epsilon!r} could not be met (noise calibration "
        f"stopped at epsilon {eps:.4g} with noise multiplier {sigma:.4g})"
    )


def _noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Opacus's ``get_noise_multiplier`` (same search, same result), for any registered
    accountant: double sigma until epsilon is below the target, then bisect to within 0.01."""
    acc = ACCOUNTANTS.get(accountant)()

    def eps(sigma: float) -> float:
        acc.history = [(sigma, sample_rate, steps)]
        return float(acc.get_epsilon(delta=delta))

    low, high, eps_high = 0.0, _SEARCH_START, math.inf
    while eps_high > target_epsilon:
        high *= 2
        eps_high = eps(high)
        if high > _SEARCH_MAX:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > 0.01:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid < target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high
