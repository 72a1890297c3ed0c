"""The options several commands share, declared once (help text and flags alike)."""

from __future__ import annotations

import typer

ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file.", exists=False)
OverwriteOption = typer.Option(
    False,
    "--overwrite",
    help="Write into a non-empty folder privseg did not create (nothing privseg did not write "
    "is replaced), or replace an existing output file.",
)
DeviceOption = typer.Option(
    None,
    "--device",
    help="auto | cpu | cuda | cuda:N (overrides train.device; auto: a CUDA GPU when present).",
)
SetOption = typer.Option(
    None, "--set", "-s", help="Override a config field: section.field=value (repeatable)."
)
