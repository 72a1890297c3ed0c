"""Inference on whole CT volumes with the same windowing, spacing and classes as training.

An input is one CT any reader of :data:`privseg.core.plugins.READERS` reads (a NIfTI file, a DICOM
series folder; :func:`privseg.data.sources.load_ct`); the mask is written in the input's own voxel
grid and affine (for DICOM: the series' voxel order and RAS affine, as dicom2nifti writes it),
with the label values of the training data (:meth:`~privseg.core.classes.Classes.output_values`).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from privseg.config import Config, DataConfig
from privseg.core.io import atomic_write_bytes
from privseg.core.output import check_output_file

MASK_SUFFIXES = (".nii.gz", ".nii")
# What predict writes a mask as: a NIfTI label map, or a DICOM Segmentation of its series.
FORMATS = ("nifti", "dicom-seg")
PREVIEW_SUFFIX = "_preview.png"
PROBABILITY_SUFFIX = "_prob.nii.gz"


@dataclass(frozen=True)
class CTInput:
    """A CT volume as the model sees it (canonical RAS, HU) and the grid its outputs go to."""

    path: Path
    hu: np.ndarray  # float32 [X, Y, Z] canonical RAS
    zooms: tuple[float, float, float]  # mm per canonical axis
    canonical_affine: np.ndarray
    affine: np.ndarray  # the input's own grid: outputs are written on it
    header: nib.Nifti1Header  # the input's header as read (its qform and sform place the outputs)


def read_ct(
    path: str | Path,
    nan_hu: float | None,
    max_voxels: int = DataConfig().max_voxels,
    series: str | None = None,
) -> CTInput:
    """One CT (read by its format's reader: :func:`~privseg.data.sources.load_ct`), validated
    (a clear DataError naming it); ``series``: the SeriesInstanceUID to read from a DICOM
    folder holding several."""
    from privseg.data.nifti import canonical_data, replace_nan
    from privseg.data.sources import load_ct

    path = Path(path)
    original = load_ct(path, max_voxels, series)
    hu, canonical = canonical_data(original, path)
    hu = replace_nan(hu, path, nan_hu)
    sx, sy, sz = (float(z) for z in canonical.header.get_zooms()[:3])
    zooms = (sx, sy, sz)
    return CTInput(path, hu, zooms, canonical.affine, np.asarray(original.affine), original.header)


@torch.no_grad()
def predict_ct(
    model: nn.Module,
    cfg: Config,
    ct: CTInput,
    *,
    batch_size: int = 32,
    threshold: float = 0.5,
    probabilities: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(class bit sets uint8 ``[X, Y, Z]``, probabilities uint8 ``[C, X, Y, Z]`` in 1/255 or
    None), both on the canonical grid. The slices go through the case's own plane transform
    (``data.spacing``) and come back through its inverse, nearest neighbour."""
    from privseg.core.classes import probabilities_to_bits
    from privseg.data.preprocess import PlaneTransform, image_to_model_input, mask_to_image_space

    plane = PlaneTransform.of(ct.hu.shape, ct.zooms, cfg.data)
    slices = image_to_model_input(ct.hu, cfg.data, plane)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    bits, probs = [], []
    for i in range(0, len(slices), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(slices[i : i + batch_size]))[:, None]
        prob = torch.sigmoid(model(x.float().to(device)).float())
        bits.append(probabilities_to_bits(prob, threshold))
        if probabilities:
            probs.append(torch.round(prob * 255).to(torch.uint8).cpu().numpy())
    mask = mask_to_image_space(np.concatenate(bits), ct.hu.shape, plane)
    if not probabilities:
        return mask, None
    stacked = np.concatenate(probs)  # [Z, C, R, R]
    per_class = [
        mask_to_image_space(np.ascontiguousarray(stacked[:, k]), ct.hu.shape, plane)
        for k in range(stacked.shape[1])
    ]
    return mask, np.stack(per_class)


def _to_input_grid(volume: np.ndarray, ct: CTInput) -> np.ndarray:
    """A canonical ``[X, Y, Z, ...]`` array reoriented to the input's own voxel order."""
    orig = nib.orientations.io_orientation(ct.affine)
    can = nib.orientations.io_orientation(ct.canonical_affine)
    return nib.orientations.apply_orientation(volume, nib.orientations.ornt_transform(can, orig))


def _nifti_bytes(
    data: np.ndarray, ct: CTInput, out: Path, dtype: type, scale: float = 1.0
) -> bytes:
    """A mask NIfTI with a fresh header: nothing of the CT's copied but its placement (its
    own qform and sform, codes included, so ITK-based viewers such as 3D Slicer and ITK-SNAP
    put the mask where they put the CT), units mm, no display range (a viewer honouring the
    CT's -1024..3071 shows a 0/1 mask black)."""
    img = nib.Nifti1Image(data.astype(dtype), None)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(scale, 0.0)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"privseg mask" if data.ndim == 3 else b"privseg probabilities"
    qform, qcode = ct.header.get_qform(coded=True) if ct.header is not None else (None, 0)
    sform, scode = ct.header.get_sform(coded=True) if ct.header is not None else (None, 0)
    if qform is None and sform is None:  # DICOM, or a NIfTI placed by neither: its affine
        qform, qcode, sform, scode = ct.affine, 1, ct.affine, 1
    img.set_qform(qform, code=int(qcode))
    img.set_sform(sform, code=int(scode))
    raw = img.to_bytes()  # in memory: no temporary file of our own to leave behind
    return gzip.compress(raw) if out.name.lower().endswith(".gz") else raw


def nifti_stem(name: str) -> str:
    """``ct_001.nii.gz`` -> ``ct_001``; a name without a NIfTI suffix stays as it is."""
    ending = next((s for s in MASK_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(ending)]


def companions(out: Path, probabilities: bool, preview: bool) -> dict[str, Path]:
    """The files written next to a mask ``out``: ``mask_prob.nii.gz``, ``mask_preview.png``."""
    stem = nifti_stem(out.name)  # a wrong suffix is refused by the claim
    files = {"mask": out}
    if probabilities:
        files["probabilities"] = out.with_name(stem + PROBABILITY_SUFFIX)
    if preview:
        files["preview"] = out.with_name(stem + PREVIEW_SUFFIX)
    return files


def claim_outputs(
    files: dict[str, Path], inputs: list[Path], overwrite: bool, ours: frozenset[Path] = frozenset()
) -> None:
    """Check every output before any work: suffix, folder, never an input, no clobbering
    (``ours``: files an earlier run of privseg wrote, which may be replaced)."""
    for kind, path in files.items():
        suffixes = {"preview": (".png",), "probabilities": (".nii.gz",)}.get(kind, MASK_SUFFIXES)
        replace = overwrite or path in ours
        check_output_file(path, inputs=inputs, suffixes=suffixes, overwrite=replace)


def write_outputs(
    files: dict[str, Path], ct: CTInput, cfg: Config, mask: np.ndarray, probs: np.ndarray | None
) -> dict[str, Any]:
    """Write the label map (and probabilities, preview) on the input's grid, each atomically
    and 0600 (patient data)."""
    from privseg.core.classes import Classes

    classes = Classes.of(cfg.data)
    labels = _to_input_grid(classes.to_label_map(mask), ct)
    atomic_write_bytes(files["mask"], _nifti_bytes(labels, ct, files["mask"], np.uint8))
    if probs is not None and "probabilities" in files:
        channels_last = _to_input_grid(np.moveaxis(probs, 0, -1), ct)  # [X, Y, Z, C]
        data = _nifti_bytes(channels_last, ct, files["probabilities"], np.uint8, 1 / 255)
        atomic_write_bytes(files["probabilities"], data)
    if "preview" in files:
        from privseg.inference.preview import preview_png

        preview_png(files["preview"], ct.hu, mask, cfg.data.hu_window, classes.names, ct.zooms)
    counts = {n: int(classes.channel(mask, k).sum()) for k, n in enumerate(classes.names)}
    return {
        "input": str(ct.path),
        "files": {k: str(v) for k, v in files.items()},
        "slices": int(mask.shape[2]),
        "foreground_voxels": int((mask > 0).sum()),
        "class_voxels": counts,
    }


def load_model(checkpoint: Path, device: str) -> tuple[nn.Module, Config]:
    from privseg.core.device import resolve_device
    from privseg.models.checkpoint import load_checkpoint

    target = resolve_device(device, field="device")  # a GPU this machine lacks: refused first
    model, cfg, _ = load_checkpoint(checkpoint)
    return model.to(target), cfg


def segment_nifti(
    checkpoint: Path,
    image: Path,
    out: Path,
    *,
    batch_size: int = 32,
    threshold: float = 0.5,
    overwrite: bool = False,
    device: str = "auto",
    probabilities: bool = False,
    preview: bool = False,
    series: str | None = None,
    fmt: str = "nifti",
) -> dict[str, Any]:
    """Segment ``image`` (a NIfTI file or a DICOM series folder) and write the mask NIfTI
    ``out`` (plus ``*_prob.nii.gz`` and ``*_preview.png`` when asked), atomically; with
    ``fmt="dicom-seg"`` a DICOM Segmentation ``out`` (.dcm) of the DICOM series instead.

    Every output is checked before any work: a NIfTI name in an existing folder, never the
    input, an existing file only with ``overwrite``. ``device``: "auto", "cpu", "cuda" or
    "cuda:N" (see :func:`privseg.core.device.resolve_device`).
    """
    from privseg.core.errors import ConfigError, DataError

    image, out = Path(image), Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is invalid: allowed values are {', '.join(FORMATS)}")
    files = companions(out, probabilities, preview)
    if fmt == "dicom-seg":
        if not image.is_dir():
            raise DataError(
                f"--format dicom-seg: {image} is not a DICOM series folder (a DICOM "
                "Segmentation references the series it was made from)"
            )
        if probabilities or preview:
            raise ConfigError(
                "--format dicom-seg writes the segmentation only: drop "
                "--probabilities and --preview, or predict a NIfTI for them"
            )
        check_output_file(out, inputs=[image, checkpoint], suffixes=(".dcm",), overwrite=overwrite)
    else:
        claim_outputs(files, [image, checkpoint], overwrite)
    model, cfg = load_model(checkpoint, device)
    ct = read_ct(image, cfg.data.nan_hu, cfg.data.max_voxels, series)
    mask, probs = predict_ct(
        model, cfg, ct, batch_size=batch_size, threshold=threshold, probabilities=probabilities
    )
    if fmt == "nifti":
        return write_outputs(files, ct, cfg, mask, probs)
    from privseg.core.classes import Classes
    from privseg.inference.dicom_seg import write_dicom_seg

    classes = Classes.of(cfg.data)
    channels = [_to_input_grid(classes.channel(mask, k), ct) for k in range(len(classes.names))]
    write_dicom_seg(out, image, np.stack(channels, -1), classes.names, series=series)
    return {
        "input": str(ct.path),
        "files": {"mask": str(out)},
        "slices": int(mask.shape[2]),
        "foreground_voxels": int((mask > 0).sum()),
        "class_voxels": {n: int(c.sum()) for n, c in zip(classes.names, channels, strict=True)},
    }
