"""`privseg predict`: segment CT volumes (NIfTI files or DICOM series) with a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from privseg.cli.common import progress_bar, say, user_errors
from privseg.cli.options import DeviceOption, OverwriteOption
from privseg.core.choices import MaskFormat
from privseg.core.errors import ConfigError
from privseg.core.plugins import ct_formats


def _describe(stats: dict[str, Any]) -> str:
    counts = stats["class_voxels"]
    voxels = (
        f"{stats['foreground_voxels']} foreground voxels"
        if list(counts) == ["foreground"]
        else ", ".join(f"{n} {v} voxels" for n, v in counts.items())
    )
    extra = [v for k, v in stats["files"].items() if k != "mask"]
    also = f" (also {', '.join(extra)})" if extra else ""
    return f"wrote {stats['files']['mask']}: {voxels} in {stats['slices']} slices{also}"


@user_errors
def predict(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="checkpoint.pt of a run."),
    image: Path = typer.Option(
        ...,
        "--image",
        help=f"A CT: {ct_formats()}; or a folder of them (of one kind; a DICOM series: one "
        "subfolder each) when --out is a folder.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Mask to write (.nii.gz or .nii); a folder (created) for a folder of CTs: "
        "<case>.nii.gz each.",
    ),
    probabilities: bool = typer.Option(
        False,
        "--probabilities",
        help="Also write <mask>_prob.nii.gz: one sigmoid probability per class (4th axis), "
        "steps of 1/255.",
    ),
    preview: bool = typer.Option(
        False, "--preview", help="Also write <mask>_preview.png: 4 slices, each class outlined."
    ),
    overwrite: bool = OverwriteOption,
    resume: bool = typer.Option(
        False,
        "--continue",
        help="A folder of CTs: skip the cases an earlier run into --out finished (same "
        "checkpoint and options, files unchanged) and redo the rest.",
    ),
    fmt: MaskFormat = typer.Option(
        "nifti",
        "--format",
        help="nifti: a label map on the CT's grid; dicom-seg: a DICOM Segmentation (.dcm) of "
        "a DICOM series, for a PACS viewer.",
    ),
    series: str | None = typer.Option(
        None,
        "--series",
        help="A DICOM folder holding several series: the SeriesInstanceUID to segment.",
    ),
    device: str | None = DeviceOption,
) -> None:
    """Segment CTs slice by slice into masks on each input's grid.

    Each mask has its input's grid and affine and the label values of the training data
    (data.classes)."""
    from privseg.inference import segment_folder, segment_nifti
    from privseg.inference.volume import MASK_SUFFIXES

    options = {"overwrite": overwrite, "device": device or "auto"}
    options |= {"probabilities": probabilities, "preview": preview}
    if not image.is_dir() or out.name.lower().endswith((*MASK_SUFFIXES, ".dcm")):  # one CT
        if resume:
            raise ConfigError("--continue applies to a folder of CTs (an --out folder)")
        say(_describe(segment_nifti(checkpoint, image, out, series=series, fmt=fmt, **options)))
        return
    if series is not None or fmt != "nifti":
        raise ConfigError(
            "--series and --format dicom-seg apply to one DICOM series, not a folder of CTs"
        )
    with progress_bar() as bar:
        done = segment_folder(checkpoint, image, out, progress=bar, resume=resume, **options)
    for stats in done.written:
        say(_describe(stats))
    skipped = f", {len(done.skipped)} finished earlier (skipped)" if done.skipped else ""
    say(f"{len(done.written)} CT(s) segmented into {out}{skipped}")
    if done.failed:
        say("", label=f"{len(done.failed)} CT(s) failed:", style="bold red", err=True)
        for name, why in done.failed.items():
            say(f"  {name}: {why}", err=True)
        say("fix them and rerun with --continue to finish the folder", err=True)
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
