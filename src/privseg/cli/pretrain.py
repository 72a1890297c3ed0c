"""`privseg pretrain`: a model trained on privseg's public phantom only (releases no patient)."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.common import interruptible, load_config, progress_bar, say, user_errors
from privseg.cli.options import ConfigOption, DeviceOption, SetOption
from privseg.core.choices import Organ


@user_errors
def pretrain(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write."),
    scanners: int = typer.Option(4, help="public scanners (the phantom's sites)"),
    patients: int = typer.Option(8, help="patients per public scanner"),
    seed: int = typer.Option(0, help="the public population's seed"),
    size: int = typer.Option(128, help="in-plane voxels"),
    slices: int = typer.Option(32, help="axial slices per volume"),
    organ: Organ = typer.Option("liver", help="The organ segmented (and its cancer)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs."),
    device: str | None = DeviceOption,
    config: Path | None = ConfigOption,
    set_: list[str] | None = SetOption,
) -> None:
    """Train centrally on a freshly generated public phantom; its checkpoint may start any run
    (train.init = OUT/checkpoint.pt)."""
    cfg = load_config(config, set_, **{"train.epochs": epochs, "train.device": device})
    from privseg.core.results import RunResult  # torch loads only for a valid config
    from privseg.core.run_folder import RunFolder
    from privseg.report.format import fmt
    from privseg.runs.pretrain import PublicPopulation
    from privseg.runs.pretrain import pretrain as run_pretrain

    population = PublicPopulation(scanners, patients, seed, size, slices, organ)
    stopped = f"the pretraining into {out} did not finish (a rerun starts afresh)"
    with interruptible(lambda: stopped):
        try:
            with progress_bar() as progress:
                run_pretrain(cfg, out=out, population=population, progress=progress)
        except BaseException:
            RunFolder(out).abandon()  # a folder this command created and never finished
            raise
    result = RunResult.load(RunFolder(out).results)
    say(
        f"pretrained on privseg's public phantom (seed {seed}, {scanners} x {patients} "
        f"patients; no patient released, epsilon 0): Dice {fmt(result.dice_mean)} on its "
        f"own test split; checkpoint {RunFolder(out).checkpoint}"
    )


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
