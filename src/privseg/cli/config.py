"""`privseg config show`: print the resolved configuration."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.common import load_config, say, user_errors
from privseg.cli.options import ConfigOption, SetOption

app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@app.command("show")
@user_errors
def show(config: Path | None = ConfigOption, set_: list[str] | None = SetOption) -> None:
    """Print the resolved config (defaults + file + overrides) as TOML."""
    say(load_config(config, set_).to_toml())
