"""`privseg predict`: segment a CT volume with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.common import DeviceOption, OverwriteOption, console, user_errors


@user_errors
def predict(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="checkpoint.pt of a run."),
    image: Path = typer.Option(..., "--image", help="CT volume (.nii or .nii.gz)."),
    out: Path = typer.Option(..., "--out", help="Mask to write (.nii.gz or .nii)."),
    overwrite: bool = OverwriteOption,
    device: str | None = DeviceOption,
) -> None:
    """Apply the model slice by slice; write a mask with the input's affine and header."""
    from privseg.inference import segment_nifti

    stats = segment_nifti(checkpoint, image, out, overwrite=overwrite, device=device or "auto")
    console.print(
        f"wrote {out}: {stats['foreground_voxels']} foreground voxels in {stats['slices']} slices"
    )


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
