"""`privseg data`: synthesise the phantom task and prepare per-site slice caches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from privseg.errors import PrivsegError

app = typer.Typer(help="Data: synthesise the CT phantom, prepare per-site slice caches.")
console = Console()
err_console = Console(stderr=True)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print a user error in red without a traceback and exit with code 2."""
    try:
        yield
    except PrivsegError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def update(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        yield update


@app.command()
def synth(
    out: Path = typer.Argument(..., help="task folder to write (MSD layout)"),
    sites: int = typer.Option(3, help="number of sites (scanners)"),
    patients: int = typer.Option(10, help="patients per site"),
    seed: int = typer.Option(0),
    size: int = typer.Option(128, help="in-plane voxels"),
    slices: int = typer.Option(32, help="axial slices per volume"),
    organ: str = typer.Option("liver", help="liver or pancreas"),
) -> None:
    """Write a seeded multi-site abdominal CT phantom as an MSD task folder."""
    from privseg.data.phantom import synth_task

    with _user_errors(), _progress_bar() as progress:
        path = synth_task(
            out,
            sites=sites,
            patients_per_site=patients,
            seed=seed,
            size=size,
            slices=slices,
            organ=organ,
            progress=progress,
        )
    console.print(
        f"wrote {sites * patients} phantom CTs ({organ}, {sites} sites) to {path}", soft_wrap=True
    )


@app.command()
def prepare(
    src: Path = typer.Argument(..., help="MSD task folder (dataset.json, imagesTr, labelsTr)"),
    out: Path = typer.Option(..., "--out", help="cache folder to write"),
    sites: int | None = typer.Option(None, help="number of sites (overrides data.sites)"),
    config: Path | None = typer.Option(None, "--config", help="TOML config file"),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value (repeatable)"),
) -> None:
    """Slice an MSD task into per-site train/val/test caches (reused when up to date)."""
    from privseg.config import Config
    from privseg.data.cache import prepare_cache

    with _user_errors():
        extra = [f"data.sites={sites}"] if sites is not None else []
        cfg = Config.load(config, [*overrides, *extra])
        with _progress_bar() as progress:
            cache = prepare_cache(src, out, cfg.data, seed=cfg.seed, progress=progress)
    state = "up to date, reused" if cache.reused else "built"
    console.print(
        f"slice cache {cache.root} ({state}), resolution {cache.resolution}", soft_wrap=True
    )
    console.print(_summary(cache.counts()))


def _summary(counts: dict[str, dict[str, dict[str, int]]]) -> Table:
    table = Table("site", "split", "patients", "slices", "foreground slices")
    for site, splits in counts.items():
        for split, c in splits.items():
            table.add_row(site, split, str(c["patients"]), str(c["slices"]), str(c["foreground"]))
    return table
