"""Accounting: pinned epsilons, agreement with Opacus's stepped accountants, calibration."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from privseg.core.errors import ConfigError
from privseg.privacy.accounting import calibrate_noise, epsilon

# Field notes: n=2000, expected batch 32 (q=0.016), sigma 1, 50 epochs = 3125 steps, delta 1e-5.
PINNED = {"rdp": 6.06, "prv": 5.56}


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_pinned_epsilon(accountant: str) -> None:
    eps = epsilon([(1.0, 32 / 2000, 3125)], delta=1e-5, accountant=accountant)
    assert eps == pytest.approx(PINNED[accountant], abs=0.05)


@pytest.mark.parametrize(("accountant", "cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_matches_opacus_accountant_stepped(accountant: str, cls: type) -> None:
    """Three 'rounds' with a change of noise in between, stepped one step at a time."""
    acc = cls()
    rounds = [(1.1, 0.02, 150), (0.9, 0.02, 100), (1.1, 0.02, 150)]
    for sigma, q, steps in rounds:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    ours = epsilon(rounds, delta=1e-5, accountant=accountant)
    assert ours == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-3)
    assert ours > epsilon(rounds[:2], delta=1e-5, accountant=accountant)


def test_rounds_compose_like_one_release() -> None:
    """Cumulative over rounds: 10 rounds of 30 steps == one release of 300 steps."""
    one = epsilon([(1.0, 0.05, 300)], delta=1e-5, accountant="rdp")
    many = epsilon([(1.0, 0.05, 30)] * 10, delta=1e-5, accountant="rdp")
    assert many == pytest.approx(one, rel=1e-12)
    assert epsilon([(1.0, 0.05, 30)], delta=1e-5, accountant="rdp") < one


def test_empty_and_zero_noise() -> None:
    assert epsilon([], delta=1e-5, accountant="prv") == 0.0
    assert epsilon([(1.0, 0.1, 0)], delta=1e-5, accountant="rdp") == 0.0
    assert math.isinf(epsilon([(0.0, 0.1, 5)], delta=1e-5, accountant="rdp"))


def test_bad_accountant_or_delta() -> None:
    with pytest.raises(ConfigError, match="privacy.accountant"):
        epsilon([(1.0, 0.1, 5)], delta=1e-5, accountant="gdp")
    with pytest.raises(ConfigError, match="privacy.delta"):
        epsilon([(1.0, 0.1, 5)], delta=1.5, accountant="rdp")


@pytest.mark.parametrize(("accountant", "target"), [("rdp", 3.0), ("rdp", 0.5), ("prv", 2.0)])
def test_calibrate_lands_at_or_just_below_target(accountant: str, target: float) -> None:
    q, steps = 0.02, 500
    sigma = calibrate_noise(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant
    )
    eps = epsilon([(sigma, q, steps)], delta=1e-5, accountant=accountant)
    assert 0.95 * target <= eps <= target
    # and it is (nearly) the least noise that does so
    assert epsilon([(sigma * 0.97, q, steps)], delta=1e-5, accountant=accountant) > eps


def test_calibrate_impossible_target() -> None:
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        calibrate_noise(
            target_epsilon=1e-3, delta=1e-5, sample_rate=0.5, steps=100, accountant="rdp"
        )
    with pytest.raises(ConfigError):
        calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=0.5, steps=0, accountant="rdp")
