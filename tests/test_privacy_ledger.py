"""Ledger durability and recomputation, budget refusal, and the `privseg budget` command."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from privseg.errors import DataError, PrivacyBudgetExceeded
from privseg.privacy.accounting import epsilon
from privseg.privacy.ledger import PrivacyLedger

KW = {"unit": "slice", "accountant": "rdp", "delta": 1e-5}


def test_records_are_cumulative_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "site.sqlite"
    ledger = PrivacyLedger(path)
    assert ledger.entries() == [] and ledger.epsilon(delta=1e-5, accountant="rdp") == 0.0
    rounds = [(1.0, 0.05, 40), (1.0, 0.05, 40), (1.3, 0.05, 80)]
    eps = []
    for i, (s, q, n) in enumerate(rounds):
        rid = ledger.record(
            site="a", run_id=f"r{i // 2}", noise_multiplier=s, sample_rate=q, steps=n, **KW
        )
        assert rid == i + 1
        eps.append(PrivacyLedger(path).epsilon(delta=1e-5, accountant="rdp", site="a"))
    assert eps[0] < eps[1] < eps[2]
    ledger.record(site="b", run_id="r9", noise_multiplier=0.8, sample_rate=0.1, steps=10, **KW)
    again = PrivacyLedger(path)  # a restart
    assert again.history("a") == rounds
    assert again.epsilon(delta=1e-5, accountant="rdp", site="a") == pytest.approx(
        epsilon(rounds, delta=1e-5, accountant="rdp"), rel=1e-12
    )
    assert again.epsilon(delta=1e-5, accountant="rdp") > eps[2]  # all sites pooled
    assert again.sites() == ["a", "b"] and again.steps("a") == 160
    e = again.entries("a")[0]
    assert {k: e[k] for k in ("site", "run_id", "unit", "steps", "accountant")} == {
        "site": "a",
        "run_id": "r0",
        "unit": "slice",
        "steps": 40,
        "accountant": "rdp",
    }


def test_durable_settings(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    with ledger._connect() as con:
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_record_is_durable_before_return(tmp_path: Path) -> None:
    """A process that dies right after record() returns leaves the release behind."""
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        PrivacyLedger(path).record(
            site="a", run_id="r", noise_multiplier=1.0, sample_rate=0.1, steps=5, **KW
        )
        os._exit(0)  # no cleanup, no close
    os.waitpid(pid, 0)
    assert PrivacyLedger(path).history("a") == [(1.0, 0.1, 5)]


@pytest.mark.parametrize("content", ["garbage", "truncated", "foreign"])
def test_corrupt_ledger_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "site.sqlite"
    if content == "garbage":
        path.write_bytes(b"this is not sqlite" * 100)
    elif content == "truncated":
        good = tmp_path / "good.sqlite"
        PrivacyLedger(good).record(
            site="a", run_id="r", noise_multiplier=1.0, sample_rate=0.1, steps=5, **KW
        )
        con = sqlite3.connect(good)  # bulk rows in one transaction (fsync per record is slow)
        con.executemany(
            "INSERT INTO releases (time, site, run_id, unit, noise_multiplier, sample_rate, "
            "steps, accountant, delta, note) VALUES ('t', 'a', 'r', 'slice', 1, 0.1, 5, 'rdp', "
            "1e-5, ?)",
            [("x" * 200,)] * 300,
        )
        con.commit()
        con.close()
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE t (x)")
        con.commit()
        con.close()
    before = path.read_bytes()
    with pytest.raises(DataError, match="site.sqlite"):
        PrivacyLedger(path).epsilon(delta=1e-5, accountant="rdp")
    assert path.read_bytes() == before  # never silently replaced by a fresh ledger


def test_reserve_checks_the_budget_and_inserts_in_one_transaction(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.record(site="a", run_id="r", noise_multiplier=1.0, sample_rate=0.05, steps=100, **KW)
    release = {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 100, "accountant": "rdp"}
    release["delta"] = 1e-5
    after = epsilon([(1.0, 0.05, 200)], delta=1e-5, accountant="rdp")
    with pytest.raises(PrivacyBudgetExceeded, match=r"'a'.*spent.*100 steps.*budget of 1\.5"):
        ledger.reserve(site="a", run_id="r2", unit="slice", budget_epsilon=1.5, **release)
    assert ledger.steps("a") == 100  # refused: nothing written
    got = ledger.reserve(
        site="a", run_id="r2", unit="slice", budget_epsilon=after + 1e-6, **release
    )
    assert got == pytest.approx(after, rel=1e-12) and ledger.steps("a") == 200
    # another site's spend does not count against this one
    assert (
        ledger.reserve(site="b", run_id="r", unit="slice", budget_epsilon=after, **release) < after
    )


def _cli() -> typer.Typer:
    from privseg.cli import budget as budget_cli

    app = typer.Typer()
    app.command("noop")(lambda: None)  # keep `budget` a named subcommand
    budget_cli.register(app)
    return app


def test_budget_cli(tmp_path: Path) -> None:
    folder = tmp_path / "ledgers"
    for site, steps in (("a", 100), ("b", 300)):
        PrivacyLedger(folder / f"{site}.sqlite").record(
            site=site, run_id="r", noise_multiplier=1.0, sample_rate=0.05, steps=steps, **KW
        )
    runner = CliRunner()
    res = runner.invoke(
        _cli(), ["budget", str(folder), "--accountant", "rdp", "--budget", "3", "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)["sites"]}
    want = epsilon([(1.0, 0.05, 300)], delta=1e-5, accountant="rdp")
    assert rows["b"]["epsilon"] == pytest.approx(want) and rows["b"]["steps"] == 300
    assert rows["b"]["remaining"] == pytest.approx(3 - want) and rows["b"]["unit"] == "slice"
    assert [r["steps"] for r in rows["b"]["releases"]] == [300]
    res = runner.invoke(_cli(), ["budget", str(folder / "a.sqlite"), "--accountant", "rdp"])
    assert res.exit_code == 0 and "a" in res.stdout and "remaining" in res.stdout
    (tmp_path / "bad.db").write_bytes(b"nope" * 300)
    res = runner.invoke(_cli(), ["budget", str(tmp_path / "bad.db")])
    assert res.exit_code == 2
    res = runner.invoke(_cli(), ["budget", str(tmp_path / "missing.db")])
    assert res.exit_code == 2


def test_budget_table_never_shortens_a_site_name(tmp_path: Path, monkeypatch) -> None:
    from privseg.cli.common import console

    name = "university-hospital-of-somewhere"
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path).record(
        site=name, run_id="r", noise_multiplier=1.0, sample_rate=0.05, steps=10, **KW
    )
    monkeypatch.setattr(console, "width", 80)  # a narrow terminal
    res = CliRunner().invoke(_cli(), ["budget", str(path), "--accountant", "rdp"])
    assert res.exit_code == 0 and name in res.stdout, res.stdout
