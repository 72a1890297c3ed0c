"""The `privseg` command: a thin Typer layer over the library."""

from __future__ import annotations

import typer

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
from privseg.cli.common import setup_logging

app = typer.Typer(
    name="privseg",
    help="Differentially private federated CT segmentation across hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Debug logging; info logging without it."
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
    app()
