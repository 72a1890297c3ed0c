"""`privseg export`: write a checkpoint's network as TorchScript or ONNX."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.common import say, user_errors
from privseg.cli.options import OverwriteOption
from privseg.core.choices import ExportFormat


@user_errors
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="checkpoint.pt of a run."),
    fmt: ExportFormat = typer.Option(
        ..., "--format", help="torchscript writes a .pt file, onnx an .onnx file."
    ),
    out: Path = typer.Option(..., "--out", help="File to write (.pt or .onnx, by --format)."),
    overwrite: bool = OverwriteOption,
) -> None:
    """Export the network, with its preprocessing (HU window, resolution) as metadata."""
    from privseg.inference.export import export_checkpoint

    info = export_checkpoint(checkpoint, out, fmt, overwrite=overwrite)
    _, _, r, _ = info["input_shape"]
    say(
        f"wrote {out} ({info['format']}): input float32 [batch, 1, {r}, {r}] in [0, 1], "
        f"{info['out_channels']} logit channel(s); largest difference from the checkpoint "
        f"{info['max_abs_diff']:.2g}"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export)
