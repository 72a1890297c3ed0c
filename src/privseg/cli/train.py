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
from privseg.plugins import input_formats


@user_errors
def train(
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help=f"Prepared cache dir or task folder ({input_formats()}).",
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
            results = run_train(
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
    table = Table(title=f"{results['mode']} training, {'DP' if results['dp'] else 'non-private'}")
    for col in ("site", "n_train", "Dice (test)", "epsilon"):
        table.add_column(col)
    for s in results["sites"]:
        eps = s.get("epsilon")
        eps = "–" if eps is None else eps if isinstance(eps, str) else f"{eps:.2f}"
        table.add_row(s["name"], str(s["n_train"]), f"{s['dice']:.3f}", eps)
    table.add_row("mean", "", f"{results['dice_mean']:.3f}", "")
    console.print(table)
    console.print(f"wrote {out}/results.json ({results['wall_seconds']:.1f} s)")
