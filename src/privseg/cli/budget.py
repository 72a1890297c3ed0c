"""`privseg budget`: the privacy each site has spent, recomputed from its ledger(s)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from privseg.cli.common import console, user_errors
from privseg.errors import ConfigError, DataError

LEDGER_SUFFIXES = (".sqlite", ".db")


def _ledger_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in LEDGER_SUFFIXES)
            if not found:
                raise DataError(f"folder {path} holds no ledger (*.sqlite or *.db)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"privacy ledger {path} does not exist")
    return files


def budget_rows(
    paths: list[Path], *, delta: float, accountant: str, budget_epsilon: float | None
) -> list[dict[str, Any]]:
    """One row per (ledger, site): releases, steps, epsilon spent, budget and what is left."""
    from privseg.privacy.ledger import PrivacyLedger

    if not 0 < delta < 1:
        raise ConfigError(f"--delta = {delta!r} is invalid: allowed values are > 0 and < 1")
    if accountant not in ("prv", "rdp"):
        raise ConfigError(f"--accountant = {accountant!r} is invalid: allowed 'prv', 'rdp'")
    rows = []
    for file in _ledger_files(paths):
        ledger = PrivacyLedger(file)
        for site in ledger.sites():
            entries = ledger.entries(site)
            eps = ledger.epsilon(delta=delta, accountant=accountant, site=site)
            left = None if budget_epsilon is None else budget_epsilon - eps
            rows.append(
                {
                    "ledger": str(file),
                    "site": site,
                    "releases": len(entries),
                    "steps": sum(e["steps"] for e in entries),
                    "epsilon": eps if math.isfinite(eps) else None,
                    "budget": budget_epsilon,
                    "left": left if left is None or math.isfinite(left) else None,
                    "delta": delta,
                    "accountant": accountant,
                }
            )
    return rows


@user_errors
def budget(
    ledger: list[Path] = typer.Argument(..., help="Ledger files, or folders of *.sqlite/*.db."),
    delta: float = typer.Option(1e-5, "--delta", help="delta at which epsilon is reported."),
    accountant: str = typer.Option("prv", "--accountant", help="prv or rdp."),
    budget_epsilon: float | None = typer.Option(None, "--budget", help="epsilon budget per site."),
    format: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Show the (epsilon, delta) each site has spent over all its recorded releases."""
    if format not in ("table", "json"):
        raise ConfigError(f"--format = {format!r} is invalid: allowed 'table', 'json'")
    rows = budget_rows(ledger, delta=delta, accountant=accountant, budget_epsilon=budget_epsilon)
    if format == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"privacy spent (delta={delta:g}, {accountant})")
    for col in ("site", "releases", "steps", "epsilon spent", "budget", "left"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for r in rows:
        eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        bud = "-" if r["budget"] is None else f"{r['budget']:g}"
        left = "-" if r["budget"] is None else ("none" if r["left"] is None else f"{r['left']:.3f}")
        if r["left"] is not None and r["left"] < 0:
            left = f"[red]{left}[/]"
        table.add_row(r["site"], str(r["releases"]), str(r["steps"]), eps, bud, left)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("budget")(budget)
