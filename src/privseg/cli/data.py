"""`privseg data`: synthesise the phantom task and prepare per-site slice caches."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from privseg.cli.common import console, load_config, progress_bar, say, user_errors
from privseg.cli.options import ConfigOption, OverwriteOption, SetOption
from privseg.core.choices import Organ
from privseg.core.plugins import input_formats

app = typer.Typer(help="Data: synthesise the CT phantom, prepare per-site slice caches.")


@app.command()
@user_errors
def synth(
    out: Path = typer.Argument(..., help="task folder to write (MSD layout)"),
    sites: int = typer.Option(3, help="number of sites (scanners)"),
    patients: int = typer.Option(10, help="patients per site"),
    seed: int = typer.Option(0),
    size: int = typer.Option(128, help="in-plane voxels"),
    slices: int = typer.Option(32, help="axial slices per volume"),
    organ: Organ = typer.Option("liver", help="the organ segmented (and its cancer)"),
    population: str = typer.Option(
        "sites",
        help="sites (stands for the hospitals' data) or public (other scanners and anatomy, "
        "for pretraining; releases no patient)",
    ),
    overwrite: bool = OverwriteOption,
) -> None:
    """Write a seeded multi-site abdominal CT phantom as an MSD task folder."""
    from privseg.data.phantom import synth_task

    with progress_bar(transient=True) as progress:
        path = synth_task(
            out,
            sites=sites,
            patients_per_site=patients,
            seed=seed,
            size=size,
            slices=slices,
            organ=organ,
            population=population,
            progress=progress,
            overwrite=overwrite,
        )
    say(
        f"wrote {sites * patients} phantom CTs ({organ}, {population} population, {sites} "
        f"sites) to {path}"
    )


@app.command()
@user_errors
def prepare(
    src: Path = typer.Argument(
        ...,
        help=f"task folder: {input_formats()}; or a DICOM series CSV itself",
    ),
    out: Path = typer.Option(..., "--out", help="cache folder to write"),
    sites: int | None = typer.Option(None, help="number of sites (overrides data.sites)"),
    site_name: str | None = typer.Option(
        None, "--site-name", help="this hospital's site name (only with one site; data.site_name)"
    ),
    overwrite: bool = OverwriteOption,
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
) -> None:
    """Slice a task folder into per-site train/val/test caches (reused when up to date)."""
    cfg = load_config(config, overrides, **{"data.sites": sites, "data.site_name": site_name})
    from privseg.data.prepare import prepare_cache  # numpy and nibabel load for a valid config

    with progress_bar(transient=True) as progress:
        cache = prepare_cache(
            src, out, cfg.data, seed=cfg.seed, progress=progress, overwrite=overwrite
        )
    state = "up to date, reused" if cache.reused else "built"
    say(f"slice cache {cache.root} ({state}), resolution {cache.resolution}")
    console.print(_summary(cache.counts()))


def _summary(counts: dict[str, dict[str, dict[str, int]]]) -> Table:
    table = Table("site", "split", "patients", "slices", "foreground slices")
    for site, splits in counts.items():
        for split, c in splits.items():
            table.add_row(site, split, str(c["patients"]), str(c["slices"]), str(c["foreground"]))
    return table
