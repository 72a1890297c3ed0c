"""`privseg budget`: the privacy each site has spent, recomputed from its ledger(s)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import typer
from rich.table import Table

from privseg.cli.common import console, user_errors
from privseg.core.choices import OutputFormat
from privseg.core.errors import ConfigError, DataError
from privseg.core.plugins import ACCOUNTANTS, input_formats
from privseg.report.format import MISSING, fmt, fmt_value


@user_errors
def budget(
    data: Path | None = typer.Option(
        None,
        "--data",
        help=f"A prepared cache or a task folder ({input_formats()}): its patients, by site.",
    ),
    ledgers: Path | None = typer.Option(
        None,
        "--ledgers",
        help="The ledger store's folder (default: privacy.ledger_dir's default, "
        "$PRIVSEG_LEDGER_DIR or the per-user store).",
    ),
    delta: float | None = typer.Option(
        None, "--delta", help="delta of the reported epsilon (default: the budget's delta)."
    ),
    accountant: str | None = typer.Option(
        None,
        "--accountant",
        click_type=click.Choice(ACCOUNTANTS.names()),  # the registered accountants
        help="Accountant of the reported epsilon (default: the releases' own).",
    ),
    format: OutputFormat = typer.Option("table", "--format", help="How to print the result."),
    adopt: bool = typer.Option(
        False,
        "--adopt",
        help="Register the store of --ledgers with this machine's registry (a store brought "
        "from another machine): it then accounts every patient it holds.",
    ),
) -> None:
    """Show the (epsilon, delta) patients have spent over every recorded release, by site.

    A patient is known by the content of its image voxels, so the answer is the same for a
    task folder and every cache prepared from it, wherever they lie. The store's
    integrity is checked first: an edited or truncated store is an error, never less spent.
    """
    from privseg.data.contents import patients_by_site
    from privseg.privacy.budget import recorded_sites, site_budgets  # Opacus loads when needed
    from privseg.privacy.stores import LEDGER_FILE, open_store, store_dir, store_of

    groups = patients_by_site(data) if data is not None else None
    everyone = [p for g in (groups or {}).values() for p in g]
    folder = store_dir(ledgers) if ledgers or not everyone else store_of(everyone) or store_dir()
    if not (folder / LEDGER_FILE).is_file():
        raise DataError(f"no privacy ledger store in {folder}: nothing has been recorded there")
    if adopt and ledgers is None:
        raise ConfigError("--adopt needs --ledgers DIR: the store to register")
    ledger = open_store(folder, adopt=adopt, reading=True)  # a store cut short still fails
    groups = groups if groups is not None else recorded_sites(ledger)
    sites = site_budgets(ledger, groups, delta=delta, accountant=accountant)
    if format == "json":
        typer.echo(json.dumps({"sites": sites}, indent=2))
        return
    table = Table(title=f"privacy spent by patients, per site (store {ledger.path})")
    longest = max((len(r["name"]) for r in sites), default=4)
    cols = ("site", "patients", "unit", "releases", "steps", "epsilon", "delta", "budget", "left")
    for col in cols:
        # a site's name is never shortened: it is what a hospital looks for in the table
        table.add_column(
            col,
            justify="left" if col in ("site", "unit") else "right",
            no_wrap=col == "site",
            min_width=longest if col == "site" else None,
        )
    for r in sites:
        bud = (
            MISSING
            if r["budget_epsilon"] is None
            else f"{fmt(r['budget_epsilon'], 'g')} at delta {fmt(r['budget_delta'], 'g')}"
        )
        left = r["remaining"]
        shown = fmt(left, ".3f")  # "-inf": spent past the budget
        if isinstance(left, str) or (left is not None and left < 0):
            shown = f"[red]{shown}[/]"
        eps = fmt(r["epsilon"], ".3f")  # "inf" after a release without DP
        table.add_row(
            r["name"],
            str(r["patients"]),
            fmt_value(r["unit"]),
            str(len(r["releases"])),
            str(r["steps"]),
            f"{eps} ({r['accountant']})",
            fmt(r["delta"], "g"),
            bud,
            shown,
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("budget")(budget)
