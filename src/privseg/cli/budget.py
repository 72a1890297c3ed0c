"""`privseg budget`: the privacy each site has spent, recomputed from its ledger(s)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from privseg.cli.common import console, user_errors
from privseg.errors import ConfigError


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
    from privseg.privacy.budget import budget_rows  # Opacus loads only when needed

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
