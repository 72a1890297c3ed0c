"""Issue 22 finding 4: an evaluation answer from a DP site is a release (noised and recorded on
the evaluated patients, bounded in number) or it is refused."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from privseg.config import PrivacyConfig
from privseg.core.errors import DataError, PrivacyBudgetExceeded
from privseg.privacy.accounting import epsilon
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.metric_release import release_metrics

P = [f"{i:064x}" for i in range(4)]
CLASSES = ["liver", "tumour"]
RESULT = {
    "patients": [
        {"id": str(i), "dice": d, "classes": {"liver": {"dice": d}, "tumour": {"dice": d / 2}}}
        for i, d in enumerate((0.9, 0.8, float("nan"), 1.0))
    ]
}


def answer(ledger: PrivacyLedger, cfg: PrivacyConfig, run_id: str = "r") -> dict | None:
    return release_metrics(
        cfg, ledger, RESULT, P, site="a", run_id=run_id, classes=CLASSES, unit="slice"
    )


def test_without_eval_noise_the_query_is_refused_and_nothing_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    assert answer(ledger, PrivacyConfig(enabled=True)) is None
    assert ledger.rows() == []


def test_an_answer_is_recorded_first_as_one_gaussian_step_on_the_evaluated_patients(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    cfg = PrivacyConfig(enabled=True, eval_noise=3.0, accountant="rdp")
    got = answer(ledger, cfg)
    assert got is not None and set(got) == {"dice", *CLASSES}
    (row,) = ledger.rows()
    assert row["kind"] == "gaussian" and row["patients"] == set(P)
    assert (row["noise_multiplier"], row["sample_rate"], row["steps"]) == (3.0, 1.0, 1)
    eps, _ = ledger.worst(P, delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(epsilon([(3.0, 1.0, 1)], delta=1e-5, accountant="rdp"))


def test_the_noise_has_the_stated_scale(tmp_path: Path) -> None:
    """sd of each noised mean = eval_noise * sqrt(1 + classes) / patients; mean unbiased on the
    clipped values (NaN counts as 0)."""
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    cfg = PrivacyConfig(enabled=True, eval_noise=0.5, eval_queries=10_000, accountant="rdp")
    draws = np.array([list(answer(ledger, cfg).values()) for _ in range(400)])  # type: ignore[union-attr]
    truth = np.array([0.9 + 0.8 + 0 + 1.0, 0.9 + 0.8 + 0 + 1.0, (0.9 + 0.8 + 1.0) / 2]) / 4
    sd = 0.5 * math.sqrt(3) / 4
    assert np.allclose(draws.mean(0), truth, atol=4 * sd / math.sqrt(400))
    assert np.allclose(draws.std(0), sd, rtol=0.15)


def test_queries_per_run_are_bounded_and_the_budget_binds(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    cfg = PrivacyConfig(enabled=True, eval_noise=2.0, eval_queries=2, accountant="rdp")
    assert answer(ledger, cfg) is not None and answer(ledger, cfg) is not None
    assert answer(ledger, cfg) is None  # the third of this run: refused, not recorded
    assert len(ledger.rows()) == 2
    assert answer(ledger, cfg, run_id="r2") is not None
    tight = PrivacyConfig(enabled=True, eval_noise=2.0, accountant="rdp", budget_epsilon=0.5)
    with pytest.raises(PrivacyBudgetExceeded):
        answer(ledger, tight, run_id="r3")


# ---- the site's policy (federated/client_app.py) -------------------------------------------------
def _site(tmp_path: Path, *, trained: bool, eval_noise: float | None):
    from conftest import FakeTrainer, small_cfg
    from privseg.federated import client_app as ca

    ca.release_trainers()  # a trainer cached by another test under the same run id
    cfg = small_cfg().replace(**{"privacy.eval_noise": eval_noise, "privacy.accountant": "rdp"})
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    trainer = FakeTrainer(cfg, name="a", ledger=tmp_path / "fake.json", budget_steps=None)
    trainer.privacy = SimpleNamespace(
        ledger=ledger, trained=trained, plan=SimpleNamespace(unit="slice")
    )
    trainer.splits = {
        "test": SimpleNamespace(contents=P[:2]),
        "val": SimpleNamespace(contents=P[2:]),
    }

    def factory(*_a, **_k):
        return trainer

    return ca, cfg, ledger, factory


def _config(cfg, split: str) -> dict:
    from privseg.federated import messages as M

    return {M.CFG_TOML: cfg.to_toml(), M.CFG_RUN_ID: "r1", M.CFG_PLANNED_STEPS: 6,
            M.CFG_LOCAL_STEPS: 3, M.CFG_SPLIT: split}  # fmt: skip


def test_a_site_never_evaluates_on_its_training_patients(tmp_path: Path) -> None:
    ca, cfg, ledger, factory = _site(tmp_path, trained=True, eval_noise=2.0)
    settings = ca.SiteSettings("a", tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="never the training patients"):
        ca.site_evaluate(_config(cfg, "train"), {}, settings, factory)
    assert ledger.rows() == []


def test_a_dp_site_answers_noised_and_recorded_only_for_a_run_it_trained_in(
    tmp_path: Path,
) -> None:
    from privseg.federated import messages as M

    ca, cfg, ledger, factory = _site(tmp_path, trained=False, eval_noise=2.0)
    settings = ca.SiteSettings("a", tmp_path, tmp_path / "out")
    out = ca.site_evaluate(_config(cfg, "test"), {}, settings, factory)
    assert math.isnan(out[M.DICE]) and ledger.rows() == []  # not this site's run: refused
    ca, cfg, ledger, factory = _site(tmp_path / "b", trained=True, eval_noise=2.0)
    out = ca.site_evaluate(_config(cfg, "test"), {}, settings, factory)
    assert math.isfinite(out[M.DICE]) and set(out) <= M.DP_EVAL_KEYS
    (row,) = ledger.rows()
    assert row["kind"] == "gaussian" and row["patients"] == set(P[:2]) and row["run_id"] == "r1"


def test_the_run_reports_its_evaluation_release_too(tmp_path: Path) -> None:
    """Review finding 6: results.json said epsilon 2.00 for a run whose evaluation answer was
    recorded at epsilon 10 on the test patients; the site's epsilon now covers every patient
    the run released on."""
    from privseg.privacy.engine import SitePrivacy
    from privseg.privacy.plan import DPPlan

    cfg = PrivacyConfig(enabled=True, noise_multiplier=2.0, target_epsilon=None, eval_noise=0.5,
                        accountant="rdp", delta=1e-5)  # fmt: skip
    units = np.arange(40)
    plan = DPPlan.build(cfg, n_units=40, batch_size=4, steps=10, site="a")
    train = [f"{i:064x}" for i in range(100, 140)]
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    sp = SitePrivacy(cfg, plan, site="a", units=units, ledger=ledger, patients={"a": train},
                     run_id="r")  # fmt: skip
    sp.reserve(10)
    trained_only = sp.summary()["epsilon"]
    assert answer(ledger, cfg) is not None  # recorded on P, the test patients, run "r"
    summary = sp.summary()
    query = epsilon([(0.5, 1.0, 1)], delta=1e-5, accountant="rdp")
    assert trained_only < query <= summary["epsilon"] and summary["epsilon_run"] >= query
    assert any(r["kind"] == "gaussian" for r in summary["releases"])
