"""The K-way identification audit: the attacker wins without noise, stays within the bound."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TinyNet
from privseg.attack import audit


def _data(n: int = 16, r: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, r, r, generator=g)
    return x, (x > 0.6).float()


def test_without_noise_the_attacker_always_wins() -> None:
    torch.manual_seed(0)
    x, y = _data()
    res = audit.audit_model(
        TinyNet(),
        x,
        y,
        max_grad_norm=1.0,
        noise_multiplier=0.0,
        epsilon=None,
        delta=1e-5,
        trials=40,
        candidates=4,
    )
    assert res["success_rate"] == 1.0 and res["bound"] == 1.0
    # no DP: there is no epsilon to check, so the audit does not apply (never "held")
    assert res["held"] is None and res["verdict"] == "does not apply"
    for key in (
        "trials",
        "success_rate",
        "bound",
        "held",
        "epsilon",
        "delta",
        "candidates",
        "noise_multiplier",
        "max_grad_norm",
    ):
        assert key in res


def test_with_noise_success_stays_within_the_bounds() -> None:
    torch.manual_seed(0)
    x, y = _data()
    sigma = 4.0
    res = audit.audit_model(
        TinyNet(),
        x,
        y,
        max_grad_norm=1.0,
        noise_multiplier=sigma,
        epsilon=10.0,  # covers the single release (its own epsilon is about 2.1)
        delta=1e-5,
        trials=120,
        candidates=2,
    )
    assert res["reported_bound_applies"] and res["held"] and res["held_gdp"]
    assert res["ci"][0] <= res["bound_gaussian"] + 1e-9
    assert abs(res["bound_gaussian"] - audit.stats.norm.cdf(1 / sigma)) < 1e-6


def test_bounds_are_consistent() -> None:
    assert audit.generic_bound(0.0, 0.0, 4) == pytest.approx(0.25)
    assert audit.generic_bound(math.log(3), 0.0, 2) == pytest.approx(0.75)
    assert audit.gdp_bound(0.0, 5) == pytest.approx(0.2)
    assert audit.simplex_success(1e9, 3) == pytest.approx(1 / 3, abs=1e-6)
    # the exact Gaussian bound is never above the generic f-DP one
    for sigma in (0.5, 1.0, 2.0):
        for k in (2, 5):
            assert audit.simplex_success(sigma, k) <= audit.gdp_bound(2 / sigma, k) + 1e-9
    # epsilon of one mu-GDP release: mu = 1 at delta 1e-5 is about 4.4 (Dong et al. 2019)
    assert 3.5 < audit.gaussian_epsilon(1.0, 1e-5) < 5.0
    lo, hi = audit.clopper_pearson(50, 100)
    assert lo < 0.5 < hi


def test_an_audit_whose_release_the_reported_epsilon_does_not_cover_does_not_apply() -> None:
    """Issue 22 finding 8: the audit said held = true when its own reported_bound_applies was
    false (its single release had epsilon 11.5 > 7.99)."""
    torch.manual_seed(0)
    x, y = _data()
    res = audit.audit_model(
        TinyNet(), x, y, max_grad_norm=1.0, noise_multiplier=4.0, epsilon=1.0, delta=1e-5,
        trials=20, candidates=2,
    )  # fmt: skip
    assert res["epsilon_release"] > 1.0 and not res["reported_bound_applies"]
    assert res["held"] is None and res["verdict"] == "does not apply"
