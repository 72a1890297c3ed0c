"""The ledger store: durable, per patient, hash-chained, delta bound to the budget (issue 22)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from privseg.core.errors import DataError, PrivacyBudgetExceeded
from privseg.privacy.accounting import epsilon
from privseg.privacy.history import Budget
from privseg.privacy.ledger import LedgerTampered, PrivacyLedger

KW = {"unit": "slice", "accountant": "rdp", "delta": 1e-5}
A = [f"{i:064x}" for i in range(3)]  # three patients' content fingerprints
B = [f"{i:064x}" for i in range(3, 5)]


def release(ledger: PrivacyLedger, patients: list[str], steps: int = 100, **kw: object) -> float:
    args = {"site": "a", "run_id": "r", "noise_multiplier": 1.0, "sample_rate": 0.05, **KW}
    return ledger.reserve(patients=patients, steps=steps, **{**args, **kw})  # type: ignore[arg-type]


def steps(ledger: PrivacyLedger, patients: list[str]) -> int:
    return sum(r["steps"] for r in ledger.worst(patients, delta=1e-5, accountant="rdp")[1])


def test_releases_compose_per_patient_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = PrivacyLedger(path)
    assert ledger.rows() == [] and ledger.worst(A, delta=1e-5, accountant="rdp") == (0.0, [])
    release(ledger, A, steps=100)
    release(ledger, A[:1] + B, steps=50, site="b")  # patient A[0] moved to site b
    again = PrivacyLedger(path)
    eps, releases = again.worst(A, delta=1e-5, accountant="rdp")
    assert [r["steps"] for r in releases] == [100, 50]  # A[0] is the patient who spent most
    assert eps == pytest.approx(epsilon([(1.0, 0.05, 100), (1.0, 0.05, 50)], **_acc()))
    assert again.worst(A[1:], delta=1e-5, accountant="rdp")[0] == pytest.approx(
        epsilon([(1.0, 0.05, 100)], **_acc())
    )
    assert steps(again, B) == 50


def _acc() -> dict[str, object]:
    return {"delta": 1e-5, "accountant": "rdp"}


def test_durable_settings_and_private_file(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    with ledger._connect() as con:
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert (tmp_path / "l.sqlite").stat().st_mode & 0o777 == 0o600


def test_a_release_is_durable_before_reserve_returns(tmp_path: Path) -> None:
    """A process that dies right after reserve() returns leaves the release behind."""
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        release(PrivacyLedger(path), A, steps=5)
        os._exit(0)  # no cleanup, no close
    os.waitpid(pid, 0)
    assert steps(PrivacyLedger(path), A) == 5


@pytest.mark.parametrize("content", ["garbage", "foreign"])
def test_a_foreign_file_is_refused_and_kept(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.sqlite"
    if content == "garbage":
        path.write_bytes(b"this is not sqlite" * 100)
    else:
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE t (x)")
        con.commit()
        con.close()
    before = path.read_bytes()
    with pytest.raises(DataError, match="ledger.sqlite"):
        PrivacyLedger(path).rows()
    assert path.read_bytes() == before  # never silently replaced by a fresh ledger


# ---- finding 7: an edited ledger is refused, never read as less spent -------------------------
def _sql(path: Path, statement: str) -> None:
    con = sqlite3.connect(path)
    con.execute(statement)
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE releases SET noise_multiplier = 50",
        "DELETE FROM releases WHERE kind = 'budget'",
        "DELETE FROM releases",
        "DELETE FROM releases WHERE id = (SELECT MAX(id) FROM releases)",
        "UPDATE releases SET patients = '[]' WHERE kind = 'dp-sgd'",
        "DELETE FROM meta WHERE key = 'head'",
    ],
)
def test_an_edited_ledger_refuses_training_and_reading(tmp_path: Path, edit: str) -> None:
    """Before: UPDATE noise_multiplier=50 and deleting the budget row gave epsilon 0.04 and no
    budget; DELETE FROM releases made the site vanish from `privseg budget`."""
    path = tmp_path / "ledger.sqlite"
    ledger = PrivacyLedger(path)
    release(ledger, A, steps=100, budget=Budget(10.0, 1e-5))
    release(ledger, A, steps=100, run_id="r2")
    _sql(path, edit)
    with pytest.raises(LedgerTampered, match="integrity check.*restore it from a backup"):
        release(PrivacyLedger(path), A, steps=1)
    with pytest.raises(LedgerTampered):
        PrivacyLedger(path).worst(A, delta=1e-5, accountant="rdp")


# ---- finding 3: delta is part of the budget ----------------------------------------------------
def test_a_release_at_a_larger_delta_than_the_budget_is_refused(tmp_path: Path) -> None:
    """Before: at 2.998 of budget 3 (delta 1e-5) a run at delta 1e-3 passed without more noise."""
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    release(ledger, A, steps=100, budget=Budget(10.0, 1e-5))
    with pytest.raises(PrivacyBudgetExceeded, match="delta 0.001.*budget at delta 1e-05"):
        release(ledger, A, steps=1, delta=1e-3)
    assert steps(ledger, A) == 100
    assert ledger.budget(A) == Budget(10.0, 1e-5)
    # the budget is compared at its own delta, whatever delta a release is reported at
    ok = release(ledger, A, steps=1, delta=1e-7)
    assert ok == pytest.approx(epsilon([(1.0, 0.05, 101)], delta=1e-5, accountant="rdp"))


def test_reserve_checks_the_budget_and_inserts_in_one_transaction(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    release(ledger, A, steps=100)
    after = epsilon([(1.0, 0.05, 200)], delta=1e-5, accountant="rdp")
    with pytest.raises(PrivacyBudgetExceeded, match=r"'a'.*spent.*100 steps.*budget of 1\.5"):
        release(ledger, A, steps=100, run_id="r2", budget=Budget(1.5, 1e-5))
    assert steps(ledger, A) == 100 and ledger.budget(A) is None  # refused: nothing written
    got = release(ledger, A, steps=100, run_id="r2", budget=Budget(after + 1e-6, 1e-5))
    assert got == pytest.approx(after, rel=1e-12) and steps(ledger, A) == 200
    # other patients' spend does not count against these
    assert release(ledger, B, steps=100, budget=Budget(after, 1e-5)) < after


def test_a_non_private_release_is_infinite_and_refused_under_a_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    release(ledger, A, steps=10, budget=Budget(10.0, 1e-5))
    nonprivate = {"kind": "non-private", "noise_multiplier": 0.0, "sample_rate": 1.0}
    with pytest.raises(PrivacyBudgetExceeded, match="without DP"):
        release(ledger, A[:1], steps=5, **nonprivate)
    assert steps(ledger, A) == 10
    assert release(ledger, A[:1], steps=5, over_budget=True, **nonprivate) == float("inf")
    assert ledger.worst(A, delta=None, accountant="rdp")[0] == float("inf")
    with pytest.raises(PrivacyBudgetExceeded):  # and no DP release fits any more
        release(ledger, A[:1], steps=1)


def test_concurrent_reservations_cannot_both_pass_the_budget(tmp_path: Path) -> None:
    """Two processes, one write lock: exactly one of two releases fits the budget."""
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path)
    one = epsilon([(1.0, 0.05, 100)], delta=1e-5, accountant="rdp")
    budget = Budget(1.05 * one, 1e-5)
    pids = []
    for run in ("r1", "r2"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                release(PrivacyLedger(path), A, steps=100, run_id=run, budget=budget)
                os._exit(0)
            except PrivacyBudgetExceeded:
                os._exit(3)
        pids.append(pid)
    codes = sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids)
    assert codes == [0, 3]
    assert PrivacyLedger(path).worst(A, delta=1e-5, accountant="rdp")[0] <= budget.epsilon


def test_an_independent_accountant_recomputes_the_budget_figure(tmp_path: Path) -> None:
    """Google's PLD accountant, fed only the release list `privseg budget` prints for a site
    (its patient who spent most: two sigmas, two sites, an evaluation query), agrees with the
    epsilon it prints (PRV) within 1 %."""
    dpa = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import pld_privacy_accountant

    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    prv = {"accountant": "prv", "sample_rate": 0.02}
    release(ledger, A, noise_multiplier=1.1, steps=300, **prv)
    release(ledger, A[:1], noise_multiplier=0.9, steps=200, site="b", **prv)
    release(ledger, A[:1], kind="gaussian", noise_multiplier=8.0, sample_rate=1.0, steps=1,
            accountant="prv")  # fmt: skip
    shown = CliRunner().invoke(_cli(), ["budget", "--ledgers", str(tmp_path), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    row = next(r for r in json.loads(shown.stdout)["sites"] if r["name"] == "a")
    assert len(row["releases"]) == 3 and row["delta"] == 1e-5
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for r in row["releases"]:
        event = dpa.PoissonSampledDpEvent(
            r["sample_rate"], dpa.GaussianDpEvent(r["noise_multiplier"])
        )
        pld.compose(dpa.SelfComposedDpEvent(event, r["steps"]))
    assert row["epsilon"] == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)


# ---- the CLI ------------------------------------------------------------------------------------
def _cli() -> typer.Typer:
    from privseg.cli import budget as budget_cli

    app = typer.Typer()
    app.command("noop")(lambda: None)  # keep `budget` a named subcommand
    budget_cli.register(app)
    return app


def test_budget_cli_lists_every_recorded_site_at_the_budget_delta(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    ledger = PrivacyLedger(folder / "ledger.sqlite")
    release(ledger, A, steps=100, site="a", budget=Budget(10.0, 1e-5))
    release(ledger, B, steps=300, site="b", delta=1e-3)
    runner = CliRunner()
    res = runner.invoke(_cli(), ["budget", "--ledgers", str(folder), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)["sites"]}
    want = epsilon([(1.0, 0.05, 100)], delta=1e-5, accountant="rdp")
    assert rows["a"]["epsilon"] == pytest.approx(want) and rows["a"]["delta"] == 1e-5
    assert rows["a"]["budget_delta"] == 1e-5 and rows["a"]["remaining"] == pytest.approx(10 - want)
    assert rows["b"]["delta"] == 1e-3 and rows["b"]["budget_epsilon"] is None
    assert [r["steps"] for r in rows["b"]["releases"]] == [300]
    res = runner.invoke(_cli(), ["budget", "--ledgers", str(folder)])
    assert res.exit_code == 0 and "1e-05" in res.stdout and "budget" in res.stdout
    _sql(folder / "ledger.sqlite", "DELETE FROM releases WHERE site = 'b'")
    res = runner.invoke(_cli(), ["budget", "--ledgers", str(folder)])
    assert res.exit_code == 2 and "integrity check" in res.output  # never "b vanished"
    res = runner.invoke(_cli(), ["budget", "--ledgers", str(tmp_path / "missing")])
    assert res.exit_code == 2


def test_budget_table_never_shortens_a_site_name(tmp_path: Path, monkeypatch) -> None:
    from privseg.cli.common import console

    name = "university-hospital-of-somewhere"
    release(PrivacyLedger(tmp_path / "ledger.sqlite"), A, steps=10, site=name)
    monkeypatch.setattr(console, "width", 80)  # a narrow terminal
    res = CliRunner().invoke(_cli(), ["budget", "--ledgers", str(tmp_path)])
    assert res.exit_code == 0 and name in res.stdout, res.stdout
