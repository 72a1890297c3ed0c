"""`privseg train`: one training run (central, local-only or federated; with or without DP)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from privseg.cli.common import (
    console,
    interruptible,
    load_config,
    progress_bar,
    refuse_dp_options_without_dp,
    resume_command,
    say,
    user_errors,
)
from privseg.cli.options import ConfigOption, DeviceOption, SetOption
from privseg.core.choices import Mode
from privseg.core.io import read_json

if TYPE_CHECKING:
    from privseg.core.run_folder import RunFolder
from privseg.core.plugins import input_formats


@user_errors
def train(
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help=f"Prepared cache dir or task folder ({input_formats()}).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write."),
    mode: Mode = typer.Option("central", "--mode", "-m", help="Who trains on what data."),
    dp: bool | None = typer.Option(None, "--dp/--no-dp", help="DP-SGD at every site."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="Target epsilon (with --dp)."),
    delta: float | None = typer.Option(None, "--delta", help="Target delta (with --dp)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (central/local)."),
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds."),
    resume: bool = typer.Option(False, "--resume", help="Continue a federated run."),
    device: str | None = DeviceOption,
    config: Path | None = ConfigOption,
    set_: list[str] | None = SetOption,
) -> None:
    """Train a segmentation model and write config, metrics, checkpoint and a curve to OUT."""
    cfg = load_config(
        config,
        set_,
        **{
            "privacy.enabled": dp,
            "privacy.target_epsilon": epsilon,
            "privacy.delta": delta,
            "train.epochs": epochs,
            "federated.rounds": rounds,
            "train.device": device,
        },
    )
    refuse_dp_options_without_dp(cfg, {"--epsilon": epsilon, "--delta": delta}, set_, config)
    from privseg.core.run_folder import RunFolder  # torch loads only for a valid config
    from privseg.runs.train import train as run_train

    with interruptible(lambda: stopped(RunFolder(out), mode)):
        try:
            with progress_bar() as progress:
                run_train(
                    cfg,
                    data=data,
                    out=out,
                    mode=mode,
                    progress=progress,  # type: ignore[arg-type]
                    resume=resume,
                )
        except BaseException:
            RunFolder(out).abandon()  # a folder this command created and never finished
            raise
    from privseg.core.results import RunResult
    from privseg.report.format import fmt, fmt_eps

    result = RunResult.load(RunFolder(out).results)
    table = Table(title=f"{result.mode} training, {'DP' if result.dp else 'non-private'}")
    for col in ("site", "n_train", "Dice (test)", "epsilon"):
        table.add_column(col)
    for s in result.sites:
        eps = s.privacy.get("epsilon") if s.privacy else None
        table.add_row(s.name, fmt(s.n_train, "d"), fmt(s.dice), fmt_eps(eps))
    table.add_row("mean", "", fmt(result.dice_mean), "")
    console.print(table)
    say(f"wrote {RunFolder(out).results} ({fmt(result.wall_seconds, '.1f')} s)")


def stopped(folder: RunFolder, mode: str) -> str:
    """What an interrupted run leaves, and the command that continues it: a federated run
    resumes after its last saved round; central and local runs start afresh."""
    saved = folder.federated_state.is_file() and folder.federation_status.is_file()
    if mode == "federated" and saved:
        rounds = read_json(folder.federation_status)["round"]
        return f"{rounds} round(s) done and saved in {folder.root}; continue with: " + (
            resume_command("--resume")
        )
    return f"the {mode} run did not finish (a rerun starts afresh): {resume_command()}"
