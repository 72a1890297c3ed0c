"""Segment every CT of a folder: NIfTI files, DICOM series subfolders, or one DICOM series."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from privseg.errors import DataError
from privseg.inference.volume import (
    MASK_SUFFIXES,
    claim_outputs,
    companions,
    load_model,
    nifti_stem,
    predict_ct,
    read_ct,
    write_outputs,
)
from privseg.output import check_not_input


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(MASK_SUFFIXES)


def find_inputs(folder: Path) -> list[Path]:
    """The CTs of ``folder``: its NIfTI files, else its subfolders (DICOM series), else the
    folder itself (one series). Hidden entries are skipped."""
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    niftis = [p for p in entries if _is_nifti(p)]
    series = [p for p in entries if p.is_dir()]
    if niftis and series:
        raise DataError(
            f"input folder {folder} holds both NIfTI files and subfolders; give one kind"
        )
    return niftis or series or [folder]


def segment_folder(
    checkpoint: Path,
    folder: Path,
    out: Path,
    *,
    overwrite: bool = False,
    device: str = "auto",
    probabilities: bool = False,
    preview: bool = False,
    threshold: float = 0.5,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Write ``out/<case>.nii.gz`` (and companions) for each CT of ``folder``.

    Every output name is checked before the first case is read; ``out`` (created if missing)
    must not be, or lie inside, the input folder, so outputs never mix with inputs.
    """
    folder, out = Path(folder), Path(out)
    inputs = find_inputs(folder)
    names = [nifti_stem(p.name) for p in inputs]  # a DICOM series: its folder name
    if len(set(names)) != len(names):
        raise DataError(f"input folder {folder}: two inputs give the same case name")
    if out.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"output folder {out} is inside the input folder {folder}; choose another")
    check_not_input(out, [folder], folder=True)  # a run folder holding the checkpoint is fine
    if not out.parent.is_dir():
        raise DataError(f"output {out}: folder {out.parent} does not exist; create it first")
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        plans = [companions(out / f"{n}.nii.gz", probabilities, preview) for n in names]
        for files in plans:
            claim_outputs(files, [folder, checkpoint], overwrite)
        model, cfg = load_model(checkpoint, device)
        results = []
        for path, files in zip(inputs, plans, strict=True):
            ct = read_ct(path, cfg.data.nan_hu)
            mask, probs = predict_ct(
                model, cfg, ct, threshold=threshold, probabilities=probabilities
            )
            results.append(write_outputs(files, ct, cfg, mask, probs))
            if progress is not None:
                progress("predict", len(results), len(inputs))
    except BaseException:
        if created and not any(out.iterdir()):  # a refused run leaves no empty folder behind
            out.rmdir()
        raise
    return results
