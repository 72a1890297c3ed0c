"""`privseg train`: one training run (central, local-only or federated; with or without DP)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from privseg.cli.common import (
    ConfigOption,
    DeviceOption,
    SetOption,
    console,
    load_config,
    progress_bar,
    refuse_dp_options_without_dp,
    user_errors,
)


@user_errors
def train(
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help="Prepared cache dir or task folder (MSD, nnU-Net v2, DICOM series.csv).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write."),
    mode: str = typer.Option("central", "--mode", "-m", help="central | local | federated"),
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
    from privseg.report.format import fmt, fmt_eps
    from privseg.results import RunResult
    from privseg.run_folder import RunFolder
    from privseg.runs.train import train as run_train

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
    result = RunResult.load(RunFolder(out).results)
    table = Table(title=f"{result.mode} training, {'DP' if result.dp else 'non-private'}")
    for col in ("site", "n_train", "Dice (test)", "epsilon"):
        table.add_column(col)
    for s in result.sites:
        eps = s.privacy.get("epsilon") if s.privacy else None
        table.add_row(s.name, fmt(s.n_train, "d"), fmt(s.dice), fmt_eps(eps))
    table.add_row("mean", "", fmt(result.dice_mean), "")
    console.print(table)
    console.print(f"wrote {RunFolder(out).results} ({fmt(result.wall_seconds, '.1f')} s)")
