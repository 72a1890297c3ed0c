"""Site-owned privacy (issue 14, keyed by patient since issue 22): a budget that binds, no
mixing of units, re-checkable results, and delta / q warnings. Each finding fails closed here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from privseg.config import Config, PrivacyConfig
from privseg.core.errors import ConfigError, PrivacyBudgetExceeded
from privseg.privacy.accounting import epsilon
from privseg.privacy.engine import open_site_privacy
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.plan import MIN_USEFUL_EPSILON, DPPlan
from privseg.privacy.policy import apply_floor

RDP = {"accountant": "rdp", "delta": 1e-5}


class Units:
    """A training split of ``n`` slices, one patient per ``per`` slices (what plans read)."""

    def __init__(self, n: int = 200, per: int = 5) -> None:
        self.patient = np.arange(n) // per
        self.n = n

    def __len__(self) -> int:
        return self.n


def cfg(**privacy: object) -> Config:
    base = {"enabled": True, "target_epsilon": 2.0, "accountant": "rdp", "delta": 1e-5}
    return Config.from_dict({"privacy": {**base, **privacy}, "train": {"batch_size": 10}})


P = [f"{i:064x}" for i in range(40)]  # the 40 patients' content fingerprints


def site(tmp_path: Path, c: Config, run_id: str, steps: int = 50):
    return open_site_privacy(
        c,
        Units(),
        site="a",
        ledger=PrivacyLedger(tmp_path / "ledger.sqlite"),
        patients={"a": P},
        planned_steps=steps,
        run_id=run_id,
    )


def lifetime(ledger: PrivacyLedger) -> int:
    return sum(r["steps"] for r in ledger.worst(P, delta=1e-5, accountant="rdp")[1])


# ---- finding 3: units never mix ------------------------------------------------------------
def test_a_release_of_another_unit_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    release = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, **RDP}
    ledger.reserve(patients=P, site="a", run_id="r1", unit="slice", **release)
    with pytest.raises(ConfigError, match="slice-level releases.*do not compose"):
        ledger.reserve(patients=P[:1], site="b", run_id="r2", unit="patient", **release)
    assert lifetime(ledger) == 10


# ---- finding 4: the target is a cap of one run; the budget binds the site's lifetime ----------
def test_a_second_run_on_the_same_data_reports_the_composed_epsilon(tmp_path: Path) -> None:
    c = cfg()
    for run_id in ("r1", "r2"):
        sp = site(tmp_path, c, run_id)
        sp.reserve(50)
    s = sp.summary()
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in s["releases"]]
    assert len(history) == 2 and {r["run_id"] for r in s["releases"]} == {"r1", "r2"}
    assert s["epsilon"] == pytest.approx(epsilon(history, **RDP))  # from releases alone
    assert s["epsilon_run"] <= 2.0 < s["epsilon"]  # each run within its target; the data spent more


def test_a_resumed_run_calibrates_only_its_remaining_steps(tmp_path: Path) -> None:
    """Before: a resume re-calibrated all 50 steps on top of the 20 done (4.36 for target 4)."""
    c = cfg()
    site(tmp_path, c, "r1").reserve(20)  # then the process dies
    again = site(tmp_path, c, "r1")
    assert again.plan.steps == 30
    again.reserve(30)
    assert again.run_epsilon() <= 2.0 * 1.01


def test_a_round_past_the_calibrated_steps_is_refused(tmp_path: Path) -> None:
    """Before: a site calibrated for target 2 accepted a 200-step round (epsilon 13.65)."""
    sp = site(tmp_path, cfg(), "r1", steps=50)
    sp.reserve(40)
    with pytest.raises(PrivacyBudgetExceeded, match="calibrated its noise .* for 50 steps"):
        sp.reserve(11)
    assert lifetime(sp.ledger) == 40


def test_the_budget_raises_the_noise_then_refuses_before_any_step(tmp_path: Path) -> None:
    c = cfg(budget_epsilon=2.5)
    site(tmp_path, c, "r1").reserve(50)  # about 2 of 2.5
    with pytest.warns(UserWarning, match="noise raised"):
        second = site(tmp_path, c, "r2")
    assert second.plan.budget_bound
    second.reserve(50)
    assert second.epsilon() <= 2.5
    rows = second.ledger.rows()
    with pytest.raises(PrivacyBudgetExceeded, match=f"less than {MIN_USEFUL_EPSILON:g} remains"):
        site(tmp_path, c, "r3")
    assert second.ledger.rows() == rows  # refused before any step: nothing recorded


def test_a_config_cannot_raise_the_budget_the_ledger_holds(tmp_path: Path) -> None:
    site(tmp_path, cfg(budget_epsilon=2.5), "r1").reserve(50)
    assert PrivacyLedger(tmp_path / "ledger.sqlite").budget(P).epsilon == 2.5
    with pytest.warns(UserWarning, match="within privacy.budget_epsilon = 2.5"):
        second = site(tmp_path, cfg(budget_epsilon=100.0, target_epsilon=8.0), "r2")
    second.reserve(50)
    assert second.epsilon() <= 2.5 and second.ledger.budget(P).epsilon == 2.5


# ---- finding 1: a site's policy is a floor ---------------------------------------------------
def test_the_site_floor_is_only_ever_stricter() -> None:
    server = PrivacyConfig(enabled=False, target_epsilon=8.0, delta=1e-4, unit="slice")
    own = PrivacyConfig(target_epsilon=2.0, budget_epsilon=5.0, unit="patient", delta=1e-6)
    merged, changed = apply_floor(server, own)
    assert merged.enabled and merged.target_epsilon == 2.0 and merged.delta == 1e-6
    assert merged.unit == "patient" and merged.budget_epsilon == 5.0
    assert any(c.startswith("privacy.enabled") for c in changed)
    stricter = PrivacyConfig(enabled=True, target_epsilon=1.0, noise_multiplier=3.0, delta=1e-7)
    kept, _ = apply_floor(stricter, PrivacyConfig(enabled=True, noise_multiplier=1.0))
    assert kept.target_epsilon == 1.0 and kept.noise_multiplier == 3.0 and kept.delta == 1e-7
    moved, _ = apply_floor(PrivacyConfig(ledger_dir="/elsewhere"), own)
    assert moved.ledger_dir is None  # a server cannot move a site's ledger


def test_a_deployed_site_needs_its_own_budget(tmp_path: Path) -> None:
    from privseg.federated.site import site_policy

    with pytest.raises(ConfigError, match="--budget"):
        site_policy(tmp_path, None, None)
    path = site_policy(tmp_path, None, 4.0)
    own = Config.load(path).privacy
    assert own.enabled and own.budget_epsilon == 4.0


# ---- finding 8: delta and q --------------------------------------------------------------------
def test_delta_near_one_over_n_and_q_of_one_are_warned_about() -> None:
    p = PrivacyConfig(enabled=True, noise_multiplier=1.0, target_epsilon=None, delta=0.5 / 40)
    with pytest.warns(UserWarning, match="not far below 1/n"):
        DPPlan.build(p, n_units=40, batch_size=4, steps=10)
    with pytest.raises(ConfigError, match="must be < 1/n"):
        DPPlan.build(PrivacyConfig(enabled=True, delta=1 / 40), n_units=40, batch_size=4, steps=10)
    ok = PrivacyConfig(enabled=True, noise_multiplier=1.0, target_epsilon=None, delta=1e-6)
    with pytest.warns(UserWarning, match="no subsampling amplification"):
        assert DPPlan.build(ok, n_units=40, batch_size=64, steps=10).sample_rate == 1.0


# ---- findings 6 and 7, end to end: the ledger belongs to the data ------------------------------
@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from privseg.data.phantom import synth_task
    from privseg.data.prepare import prepare_cache

    root = tmp_path_factory.mktemp("site-owned")
    task = synth_task(root / "task", sites=2, patients_per_site=4, size=32, slices=8)
    cfg = Config.from_dict({"data": {"resolution": 32, "sites": 2}})
    return Path(prepare_cache(task, root / "cache", cfg.data, seed=0).root)


def test_runs_into_new_folders_compose_and_the_budget_refuses_a_third(
    small_cache: Path, tmp_path: Path
) -> None:
    from privseg.cli.app import app

    config = tmp_path / "cfg.toml"
    config.write_text(
        Config.from_dict(
            {
                "data": {"resolution": 32, "sites": 2},
                "model": {"features": 4, "groups": 1},
                "train": {"epochs": 1, "batch_size": 4, "threads": 1},
                "privacy": {"budget_epsilon": 4.0, "accountant": "rdp"},
            }
        ).to_toml()
    )
    runner = CliRunner()

    def train(out: str) -> object:
        args = ["train", "--data", str(small_cache), "--out", str(tmp_path / out), "--mode"]
        args += ["local", "--dp", "--epsilon", "3", "--config", str(config)]
        return runner.invoke(app, args)

    assert train("first").exit_code == 0
    second = train("second")
    assert second.exit_code == 0, second.output
    results = json.loads((tmp_path / "second" / "results.json").read_text())
    for s in results["sites"]:
        history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in s["releases"]]
        assert len({r["run_id"] for r in s["releases"]}) == 2  # both runs, from one ledger
        assert s["epsilon"] == pytest.approx(epsilon(history, accountant="rdp", delta=1e-5))
        assert s["epsilon_run"] <= 3.0 + 1e-9 < s["epsilon"] <= 4.0  # the budget bound it
    shown = runner.invoke(app, ["budget", "--data", str(small_cache), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    sites = json.loads(shown.stdout)["sites"]
    assert {s["name"] for s in sites} == {s["name"] for s in results["sites"]}
    assert all(len(s["releases"]) == 2 and s["budget_epsilon"] == 4.0 for s in sites)
    before = [len(PrivacyLedger(Path(s["ledger"])).rows()) for s in sites]
    third = train("third")
    assert third.exit_code == 2
    assert "refuses to train" in third.output and "privseg budget --data" in third.output
    assert [len(PrivacyLedger(Path(s["ledger"])).rows()) for s in sites] == before


def test_a_study_grid_that_would_overspend_is_refused_before_it_starts(
    small_cache: Path, tmp_path: Path
) -> None:
    """Finding 6: epsilon 1, 3 and 8 on the same patients compose to more than 8 (8.97 here,
    PRV; the plain sum 12 is an upper bound)."""
    from privseg.data.cache import SliceCache
    from privseg.runs.privacy import plan_grid
    from privseg.runs.study import grid

    base = Config.from_dict(
        {
            "data": {"resolution": 32, "sites": 2},
            "privacy": {"ledger_dir": str(tmp_path)},  # nothing spent yet on this data
            "study": {"epsilons": [1.0, 3.0, 8.0]},
        }
    )
    cache = SliceCache.open(small_cache)
    todo = [(s.key, s.config(base, len(cache.sites))) for s in grid(base)]
    plan = plan_grid(base, cache, todo)  # no budget: planned, logged, not refused
    assert all(8.0 < p["planned_total"] < 1 + 3 + 8 for p in plan.values())
    tight = base.replace(**{"privacy.budget_epsilon": 8.5})
    todo = [(s.key, s.config(tight, len(cache.sites))) for s in grid(tight)]
    # its non-private settings would spend the budget to infinity: refused first (issue 22)
    with pytest.raises(PrivacyBudgetExceeded, match="without DP .* nothing was run"):
        plan_grid(tight, cache, todo)
    dp_only = tight.replace(**{"study.settings": ["federated_dp"]})
    todo = [(s.key, s.config(dp_only, len(cache.sites))) for s in grid(dp_only)]
    with pytest.raises(PrivacyBudgetExceeded, match="would overspend site .* nothing was run"):
        plan_grid(dp_only, cache, todo)


def test_central_training_records_one_release_on_every_sites_patients(
    small_cache: Path, tmp_path: Path
) -> None:
    """Pooled data is every site's patients: the release names each of them."""
    from privseg.data.cache import SliceCache, SliceSplit
    from privseg.training.trainer import CENTRAL, open_privacy, training_patients

    c = cfg(ledger_dir=str(tmp_path)).replace(**{"data.resolution": 32, "data.sites": 2})
    cache = SliceCache.open(small_cache)
    pooled = SliceSplit.concat([cache.split(s, "train") for s in cache.sites])
    sp = open_privacy(c, cache, site=CENTRAL, train=pooled, planned_steps=5, run_id="c1")
    sp.reserve(5)
    (row,) = sp.ledger.rows()
    patients = training_patients(cache, CENTRAL)
    assert row["patients"] == {p for group in patients.values() for p in group}
    assert row["run_id"] == "c1" and row["steps"] == 5 and set(patients) == set(cache.sites)
    for s in cache.sites:
        assert sp.summary(s)["epsilon"] == pytest.approx(sp.ledger.worst(patients[s], **RDP)[0])


def test_a_server_cannot_loosen_a_sites_evaluation_policy() -> None:
    """Issue 22: evaluation answers are the site's to give: a server asking for a smaller
    eval_noise, more queries or non-private training gets the site's own, never its request."""
    own = PrivacyConfig(enabled=True, budget_epsilon=5.0, eval_noise=4.0, eval_queries=1)
    greedy = PrivacyConfig(eval_noise=0.01, eval_queries=1000, allow_nonprivate=True)
    merged, _ = apply_floor(greedy, own)
    assert merged.eval_noise == 4.0 and merged.eval_queries == 1 and not merged.allow_nonprivate
    refusing, _ = apply_floor(greedy, PrivacyConfig(enabled=True, budget_epsilon=5.0))
    assert refusing.eval_noise is None  # the site set no eval_noise: it answers nothing
    stricter, _ = apply_floor(PrivacyConfig(eval_noise=9.0, eval_queries=0), own)
    assert stricter.eval_noise == 9.0 and stricter.eval_queries == 0


def test_a_site_restarted_after_its_last_round_can_answer_but_not_train(tmp_path: Path) -> None:
    """Review of #24: a site whose trainer was rebuilt after the run's last round (a restarted
    site, a resumed simulation) refused the final test ("already recorded its planned
    steps"), so a resumed federation ended without its test answers."""
    first = site(tmp_path, cfg(), "r1", steps=50)
    assert not first.trained
    first.reserve(50)
    again = site(tmp_path, cfg(), "r1", steps=50)  # the same run, after a restart
    assert again.trained and again.prior_steps == 50
    assert again.noise_multiplier == first.noise_multiplier
    with pytest.raises(
        PrivacyBudgetExceeded, match=r"calibrated its noise .* for 50 steps and has run 50"
    ):
        again.reserve(1)
    assert lifetime(again.ledger) == 50
