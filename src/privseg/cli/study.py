"""`privseg run`: the whole study (what `make demo` runs on the phantom)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from privseg.cli.common import (
    console,
    interruptible,
    load_config,
    progress_bar,
    resume_command,
    say,
    user_errors,
)
from privseg.cli.options import ConfigOption, DeviceOption, SetOption
from privseg.core.choices import Preset
from privseg.core.plugins import input_formats
from privseg.report.format import fmt, fmt_eps, fmt_pm


@user_errors
def run(
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help=f"Task folder ({input_formats()}) or prepared cache.",
    ),
    out: Path = typer.Option(Path("runs/study"), "--out", "-o", help="Study folder."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Smoke test: a tiny grid (--preset quick).",
    ),
    preset: Preset = typer.Option(
        "full",
        "--preset",
        help="full (the demo's study; its time is in the README's Results), "
        "quick, or paper (Ziller et al.'s MoNet 256² setting; see README for its time).",
    ),
    device: str | None = DeviceOption,
    config: Path | None = ConfigOption,
    set_: list[str] | None = SetOption,
) -> None:
    """Run central, local-only, federated and federated-DP training plus the attack; report."""
    load_config(config, set_)  # field and value rules before torch and Flower load
    from privseg.core.run_folder import RunFolder
    from privseg.runs.study import PRESETS, run_study

    if quick:
        preset = "quick"
    # the preset over the config file, the user's --set over both
    cfg = PRESETS[preset](load_config(config, None)).with_overrides(set_ or [])
    if device is not None:
        cfg = cfg.replace(**{"train.device": device})
    with interruptible(lambda: stopped(out)), progress_bar() as progress:
        study = run_study(
            cfg,
            data=data,
            out=out,
            progress=progress,
            on_setting=say,
            preset=preset,
        )
    table = Table(title="privseg study: test Dice per setting (mean over patient volumes)")
    for col in (
        "setting",
        "Dice",
        "ε this run (max site)",
        "ε data total so far",
        "s / round or epoch",
    ):
        table.add_column(col)
    for r in study.runs:
        res = r.result
        secs = res.seconds_per_round or res.seconds_per_epoch
        table.add_row(
            r.label,
            fmt_pm(res.dice_mean, res.dice_sd),
            fmt_eps(res.epsilon_run_max),
            fmt_eps(res.epsilon_max),
            fmt(secs, ".2f"),
        )
    console.print(table)
    say(f"report: {RunFolder(out).report_html} ({fmt(study.wall_seconds, '.0f')} s)")


def stopped(out: Path) -> str:
    """What an interrupted study leaves: its finished settings, which a rerun skips."""
    from privseg.core.run_folder import RunFolder

    done = RunFolder(out).finished_settings()
    return (
        f"{len(done)} setting(s) finished in {out} ({', '.join(done) or 'none'}); the same "
        f"command skips them and runs the rest: {resume_command()}"
    )


def register(app: typer.Typer) -> None:
    app.command("run")(run)
