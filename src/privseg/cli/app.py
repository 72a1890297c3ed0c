"""The `privseg` command: a thin Typer layer over the library."""

from __future__ import annotations

import importlib

import typer

from privseg.cli import config as config_cli
from privseg.cli import train as train_cli

app = typer.Typer(
    name="privseg",
    help="Differentially private federated CT segmentation across hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(config_cli.app, name="config")
app.command("train")(train_cli.train)

# Subcommand groups whose modules own their registration (one module per subcommand group).
for _name, _attr in (("data", "app"),):
    _mod = importlib.import_module(f"privseg.cli.{_name}")
    app.add_typer(getattr(_mod, _attr), name=_name)
for _name in ("budget", "federated", "attack", "study", "predict"):
    try:
        _mod = importlib.import_module(f"privseg.cli.{_name}")
    except ModuleNotFoundError as exc:  # pragma: no cover - while parts are being built
        if exc.name != f"privseg.cli.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    app()
