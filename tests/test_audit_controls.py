"""Gradient canaries in the real DPGradient, and the controls that prove the audit can fail.

A tiny model (Linear 100 -> 100, 10,100 parameters) on 100 random records, q = 0.25, 20 steps,
m = 200 canaries, noise calibrated (PRV) for epsilon 1 at delta 1e-5. Each run takes a few
seconds; every draw is seeded, so the outcomes are fixed.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from privseg.attack.one_run import audit_scores, one_shot_estimate
from privseg.privacy.accounting import calibrate_noise
from privseg.privacy.audit_bounds import gaussian_sigma, one_run_epsilon
from privseg.privacy.canaries import GradientCanaries, cosine_scores, direction, flatten
from privseg.privacy.dp_sgd import DPGradient
from privseg.privacy.sampling import PoissonUnitSampler

N, M, Q, STEPS, DELTA, EPSILON = 100, 200, 0.25, 20, 1e-5, 1.0


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean(1)


@functools.cache
def _sigma() -> float:
    return calibrate_noise(
        target_epsilon=EPSILON, delta=DELTA, sample_rate=Q, steps=STEPS, accountant="prv"
    )


def _run(noise: str) -> tuple[GradientCanaries, nn.Module, dict[str, torch.Tensor]]:
    """DP-SGD with canaries: ``noise`` is "calibrated", "none" (sigma 0, clipping on) or
    "broken" (one step without noise, accounted as if noised)."""
    torch.manual_seed(0)
    x, y = torch.randn(N, 100), torch.randn(N, 100)
    model = nn.Linear(100, 100)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    sigma = _sigma()
    grad = DPGradient(
        max_grad_norm=1.0,
        noise_multiplier=0.0 if noise == "none" else sigma,
        expected_batch_size=N * Q,
        grad_path="loop",
        generator=torch.Generator().manual_seed(1),
    )
    dim = sum(p.numel() for p in model.parameters())
    grad.canaries = GradientCanaries(
        count=M, dim=dim, max_grad_norm=1.0, sample_rate=Q, seed=123, rng=np.random.default_rng(5)
    )
    sampler = PoissonUnitSampler(np.arange(N), sample_rate=Q, rng=np.random.default_rng(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(STEPS):
        if noise == "broken":
            grad.noise_multiplier = 0.0 if step == STEPS // 2 else sigma
        idx, groups = sampler.sample()
        opt.zero_grad()
        grad(model, _loss, x[idx], y[idx], groups)
        opt.step()
    return grad.canaries, model, start


def _audit(canaries: GradientCanaries) -> dict:
    return audit_scores(canaries.step_scores, canaries.included, delta=DELTA, fdp=False)


def test_canaries_are_committed_and_rebuilt_from_the_seed():
    c = GradientCanaries(count=50, dim=30, max_grad_norm=2.0, sample_rate=0.5, seed=42)
    assert c.commitment == hashlib.sha256(b"42").hexdigest()
    assert 10 < c.included.sum() < 40
    assert torch.allclose(c.directions[7], direction(42, 7, 30))
    assert float(c.directions[7].norm()) == pytest.approx(1.0, abs=1e-6)
    assert c.reveal()["seed"] == 42


def test_an_included_canary_is_added_before_the_noise_at_the_clip_norm():
    c = GradientCanaries(count=20, dim=6, max_grad_norm=2.0, sample_rate=1.0, seed=3)
    zeros = [torch.zeros(2, 2), torch.zeros(2)]
    added = flatten(c.add_to(zeros))  # q = 1: every included canary, no excluded one
    assert torch.allclose(added, 2.0 * c.directions[torch.from_numpy(c.included)].sum(0))


def test_final_model_scores_use_the_same_directions():
    c = GradientCanaries(count=5, dim=8, max_grad_norm=1.0, sample_rate=1.0, seed=9)
    scores = cosine_scores(9, 5, 3 * c.directions[2])
    assert scores[2] == pytest.approx(1.0, abs=1e-6)


def test_correct_run_stays_below_its_epsilon():
    res = _audit(_run("calibrated")[0])
    assert res["epsilon_lower"] < EPSILON


def test_run_without_noise_reaches_the_ceiling():
    res = _audit(_run("none")[0])
    assert res["epsilon_lower"] == pytest.approx(res["ceiling"], rel=0.05)
    assert res["epsilon_lower"] > 3 * EPSILON


def test_one_unnoised_step_fails_the_audit():
    res = _audit(_run("broken")[0])
    assert res["epsilon_lower"] > EPSILON


def test_one_shot_estimate_recovers_a_gaussian_mechanism():
    rng = np.random.default_rng(1)
    inside = rng.random(2000) < 0.5
    sigma = gaussian_sigma(2.0, DELTA)  # exactly (2, 1e-5)-DP
    est = one_shot_estimate(inside + sigma * rng.standard_normal(2000), inside, delta=DELTA)
    lo, hi = est["interval_95"]
    assert lo <= 2.0 <= hi and abs(est["epsilon"] - 2.0) < 0.5


def test_the_guessing_rules_pay_for_their_number():
    """Perfectly separated scores: the best rule (0.4m in, 0.4m out) reaches the ceiling, at
    significance 0.05 / 4, below the uncorrected ln(m / 3)."""
    inside = np.random.default_rng(2).random(M) < 0.5
    res = audit_scores(inside.astype(float), inside, delta=DELTA, fdp=False)
    expected = one_run_epsilon(m=M, r=160, v=160, delta=DELTA, significance=0.05 / 4)
    assert res["r"] == res["v"] == 160
    assert res["epsilon_lower"] == res["ceiling"] == pytest.approx(expected)
    assert res["ceiling"] < one_run_epsilon(m=M, r=M, v=M, delta=DELTA)
