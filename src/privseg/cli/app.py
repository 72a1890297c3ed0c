"""The `privseg` command: a thin Typer layer over the library."""

from __future__ import annotations

import os
from typing import Any

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from privseg import __version__
from privseg.cli import attack as attack_cli
from privseg.cli import budget as budget_cli
from privseg.cli import config as config_cli
from privseg.cli import data as data_cli
from privseg.cli import export as export_cli
from privseg.cli import federated as federated_cli
from privseg.cli import predict as predict_cli
from privseg.cli import pretrain as pretrain_cli
from privseg.cli import study as study_cli
from privseg.cli import train as train_cli
from privseg.cli.common import say, setup_logging

WORKFLOW = (
    "data",
    "pretrain",
    "train",
    "run",
    "attack",
    "audit",
    "predict",
    "export",
    "certs",
    "server",
    "site",
    "budget",
    "config",
)
"""``privseg --help`` lists the commands in the order a user meets them, not alphabetically."""


class RootGroup(TyperGroup):
    """The root command: subcommands in :data:`WORKFLOW` order (any other at the end), and every
    help text shown as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _literal_help(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: WORKFLOW.index(n) if n in WORKFLOW else len(WORKFLOW))


def _literal_help(command: click.Command) -> None:
    """Escape the help of ``command``, its options and subcommands: Typer reads help as rich
    markup, which drops bracketed words such as ``[privacy]``."""
    if command.help:
        command.help = escape(command.help)
    for param in command.params:
        if getattr(param, "help", None):  # options, and Typer's arguments
            param.help = escape(param.help)  # type: ignore[attr-defined]
    for sub in getattr(command, "commands", {}).values():
        _literal_help(sub)


app = typer.Typer(
    name="privseg",
    cls=RootGroup,
    help="Differentially private federated CT segmentation across hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        say(f"privseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Debug logging; info logging without it."
    ),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print privseg's version and exit.",
    ),
) -> None:
    setup_logging(verbose)


app.add_typer(config_cli.app, name="config")
app.command("train")(train_cli.train)

# Subcommand groups whose modules own their registration (one module per subcommand group).
app.add_typer(data_cli.app, name="data")
_modules = (budget_cli, federated_cli, attack_cli, study_cli, predict_cli, export_cli, pretrain_cli)
for _module in _modules:
    _module.register(app)


def main() -> None:
    # Patient data: what privseg's processes and the ones they start (Flower's SuperLink,
    # SuperNode, ServerApp) create is the user's alone, 0700/0600, not only what privseg
    # writes itself (a review found Flower's `.flwr/source` at 0644)
    os.umask(0o077)
    app()
