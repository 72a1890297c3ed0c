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
    ledger: list[Path] | None = typer.Argument(
        None, help="Ledger files, or folders of *.sqlite/*.db."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="A prepared cache: every site's ledger of that data."
    ),
    ledgers: Path | None = typer.Option(
        None, "--ledgers", help="With --data: the runs' privacy.ledger_dir, if they set one."
    ),
    delta: float | None = typer.Option(
        None, "--delta", help="delta of the reported epsilon (default: the releases' largest)."
    ),
    accountant: str | None = typer.Option(
        None, "--accountant", help="prv or rdp (default: the releases' own)."
    ),
    budget_epsilon: float | None = typer.Option(
        None, "--budget", help="lifetime epsilon budget per site (the ledger's own if smaller)."
    ),
    format: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Show the (epsilon, delta) each site's data has spent over every recorded release."""
    if format not in ("table", "json"):
        raise ConfigError(f"--format = {format!r} is invalid: allowed 'table', 'json'")
    if bool(ledger) == (data is not None):
        raise ConfigError("give ledger files (or folders) or --data CACHE, not both or neither")
    from privseg.privacy.budget import data_ledgers, site_budgets  # Opacus loads when needed

    files = data_ledgers(data, ledgers) if data is not None else list(ledger or [])
    sites = site_budgets(files, delta=delta, accountant=accountant, budget_epsilon=budget_epsilon)
    if format == "json":
        typer.echo(json.dumps({"sites": sites}, indent=2))
        return
    table = Table(title="privacy spent per site's data (every release, all runs)")
    longest = max((len(r["name"]) for r in sites), default=4)
    for col in ("site", "unit", "releases", "steps", "epsilon", "delta", "budget", "remaining"):
        # a site's name is never shortened: it is what a hospital looks for in the table
        table.add_column(
            col,
            justify="left" if col in ("site", "unit") else "right",
            no_wrap=col == "site",
            min_width=longest if col == "site" else None,
        )
    for r in sites:
        eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        bud = "-" if r["budget_epsilon"] is None else f"{r['budget_epsilon']:g}"
        left = r["remaining"]
        shown = "-" if r["budget_epsilon"] is None else "none" if left is None else f"{left:.3f}"
        if left is not None and left < 0:
            shown = f"[red]{shown}[/]"
        table.add_row(
            r["name"],
            r["unit"],
            str(len(r["releases"])),
            str(r["steps"]),
            f"{eps} ({r['accountant']})",
            f"{r['delta']:g}",
            bud,
            shown,
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("budget")(budget)
