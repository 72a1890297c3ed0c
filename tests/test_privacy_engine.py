"""SitePrivacy: validation, calibration for the whole run, reserve-before-run, crash safety."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TinyNet
from privseg.config import PrivacyConfig
from privseg.core.errors import ConfigError, DataError, PrivacyBudgetExceeded
from privseg.privacy.accounting import epsilon
from privseg.privacy.engine import SitePrivacy
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.plan import DPPlan, count_units

SUMMARY_KEYS = {
    "epsilon",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "accountant",
    "unit",
    "expected_batch_size",
    "epsilon_run",
    "budget_epsilon",
    "budget_delta",
    "steps_lifetime",
    "ledger",
    "releases",
}


PATIENTS = [f"{i:064x}" for i in range(40)]  # content fingerprints of the 40 patients


def cfg(**kw) -> PrivacyConfig:
    base = {
        "enabled": True,
        "unit": "patient",
        "accountant": "rdp",
        "delta": 1e-3,
        "noise_multiplier": 1.0,
        "target_epsilon": None,
    }
    return PrivacyConfig(**{**base, **kw})


def site(tmp_path: Path, units=None, *, batch=4, steps=100, **kw) -> SitePrivacy:
    units = np.repeat(np.arange(40), 3) if units is None else units  # 40 patients x 3 slices
    c = cfg(**kw)
    plan = DPPlan.build(c, n_units=count_units(units), batch_size=batch, steps=steps, site="a")
    return SitePrivacy(
        c,
        plan,
        site="a",
        units=units,
        ledger=PrivacyLedger(tmp_path / "a.sqlite"),
        patients={"a": PATIENTS},
        run_id="run1",
    )


def test_rates_summary_and_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="privseg.privacy.engine"):
        sp = site(tmp_path)
    assert sp.sample_rate == pytest.approx(4 / 40) and sp.noise_multiplier == 1.0
    assert "DP-SGD site=a unit=patient n=40" in caplog.text
    s = sp.summary()
    assert set(s) == SUMMARY_KEYS and s["steps"] == 0 and s["epsilon"] == 0.0
    sp.reserve(30)
    sp.reserve(20, run_id="run2")
    s = sp.summary()
    assert s["steps"] == 50 == s["steps_lifetime"]
    assert s["epsilon"] == pytest.approx(epsilon([(1.0, 0.1, 50)], delta=1e-3, accountant="rdp"))
    assert [e["run_id"] for e in sp.ledger.rows()] == ["run1", "run2"]
    assert all(e["patients"] == set(PATIENTS) for e in sp.ledger.rows())


def test_calibrated_once_for_the_whole_run(tmp_path: Path) -> None:
    sp = site(tmp_path, noise_multiplier=None, target_epsilon=2.0, steps=300)
    for _ in range(3):  # three rounds of 100 steps
        sp.reserve(100)
    assert 0.95 * 2.0 <= sp.epsilon() <= 2.0


def test_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"privacy.delta.*n = 40"):
        site(tmp_path, delta=1 / 40)
    with pytest.raises(DataError, match="no training data"):
        site(tmp_path, units=np.zeros(0, dtype=int))
    with pytest.warns(UserWarning, match="q = 1, so epsilon gets no subsampling amplification"):
        assert site(tmp_path, batch=41).sample_rate == 1.0
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        site(tmp_path, noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        site(tmp_path, noise_multiplier=None, target_epsilon=1e-4, batch=40, steps=1000)
    with pytest.warns(UserWarning, match="slice"):
        site(tmp_path, unit="slice", units=np.arange(120), delta=1e-3)


def test_budget_refusal_writes_nothing(tmp_path: Path) -> None:
    eps100 = epsilon([(1.0, 0.1, 100)], delta=1e-3, accountant="rdp")
    sp = site(tmp_path, budget_epsilon=eps100 * 1.01)
    sp.reserve(100)
    before = sp.ledger.rows()
    with pytest.raises(PrivacyBudgetExceeded, match="'a'"):
        sp.reserve(10)
    assert sp.ledger.rows() == before


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3))


def train(sp: SitePrivacy, steps: int, *, crash_after: int | None = None) -> int:
    """The training loop contract: reserve, then run; returns the steps actually run."""
    model = TinyNet().double()
    images = torch.rand(120, 1, 8, 8, dtype=torch.float64)
    labels = (images > 0.5).double()
    sp.reserve(steps)
    done = 0
    for _ in range(steps):
        if crash_after is not None and done == crash_after:
            raise RuntimeError("simulated crash")
        idx, groups, real = sp.sample_batch()  # unpadded: constant_time is off here by default
        stats = sp.gradient(model, loss_fn, images[idx], labels[idx], torch.as_tensor(groups), real)
        assert all(p.grad is not None for p in model.parameters())
        assert stats["units"] == len(np.unique(groups[real]))
        done += 1
    return done


@pytest.mark.parametrize("crash_after", [0, 3, None])
def test_crash_can_only_over_count(tmp_path: Path, crash_after: int | None) -> None:
    sp = site(tmp_path)
    ran = train(sp, 5)
    if crash_after is None:
        ran += train(sp, 5)
    else:
        with pytest.raises(RuntimeError):
            train(sp, 5, crash_after=crash_after)
        ran += crash_after
    restarted = site(tmp_path)  # a new process reads the same ledger
    true = epsilon([(1.0, 0.1, ran)], delta=1e-3, accountant="rdp")
    assert restarted.epsilon() >= true
    assert restarted.summary()["steps_lifetime"] == 10


def test_empty_batch_steps_count(tmp_path: Path) -> None:
    sp = site(tmp_path, batch=1)  # q = 1/40: most batches are empty
    sizes = []
    model = TinyNet().double()
    sp.reserve(20)
    for _ in range(20):
        idx, groups, real = sp.sample_batch()
        sizes.append(int(real.sum()))  # dummy slices pad the batch: only real ones count
        x = torch.rand(len(idx), 1, 8, 8, dtype=torch.float64)
        sp.gradient(model, loss_fn, x, (x > 0.5).double(), groups, real)
        assert all(
            torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters()
        )
    assert 0 in sizes
    assert sp.summary()["steps"] == 20
    assert PrivacyLedger(tmp_path / "a.sqlite").rows()[-1]["steps"] == 20
