"""NIfTI reading every reader stands on: a header checked against its file and the voxel
budget before any voxel is read, the affine checked, the volume put in canonical RAS, HU
checked (NaN, Inf, absurd values), labels checked against their declared values.

Every problem a user can cause raises :class:`~privseg.core.errors.DataError` naming the file
and what was expected.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, ImageDataError

from privseg.config import DataConfig
from privseg.core.errors import DataError
from privseg.data.task import (
    Case,
    Volume,
)

NIFTI_SUFFIX = ".nii.gz"


# Voxel-to-world matrices of an image and its label may differ by float noise from the writer.
AFFINE_ATOL = 1e-3


# A header is checked against its file and the voxel budget (data.max_voxels) before any
# voxel is read: a 30000^3 header on a tiny file once ended in MemoryError, and a 130 KB
# .nii.gz of 512^3 zeros took 1.3 GB in prepare.
MAX_VOXELS = DataConfig().max_voxels


# Deflate cannot expand data more than 1032:1, so a .gz file of n bytes holds < 1032 n bytes.
GZIP_MAX_RATIO = 1032


# HeaderDataError / ImageDataError: scaling or layout fields a header cannot have (fuzz test).
NIFTI_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    ImageDataError,
    OSError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
)


def open_nifti(path: Path, max_voxels: int = MAX_VOXELS) -> nib.Nifti1Image:
    """A 3D NIfTI with a usable affine, at most ``max_voxels`` voxels and a size its file can
    hold (nothing read yet)."""
    try:
        img = nib.load(path)
    except NIFTI_READ_ERRORS as exc:
        raise DataError(f"{path} is not a readable NIfTI file: {exc}") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image) or len(img.shape) != 3:
        raise DataError(f"{path}: expected a 3D NIfTI volume, got {type(img).__name__} {img.shape}")
    _check_size(img, path, max_voxels)
    _check_affine(img, path)
    return img


def check_voxels(voxels: int, shape: tuple[int, ...], source: object, max_voxels: int) -> None:
    """Refuse a volume over the voxel budget before it is allocated."""
    if voxels > max_voxels:
        raise DataError(
            f"{source} shape {' x '.join(str(n) for n in shape)} = {voxels} voxels is over the "
            f"limit of {max_voxels} voxels per volume (data.max_voxels; prepare needs about 10 "
            "bytes per voxel): the header is wrong, or raise data.max_voxels on a machine with "
            "the memory"
        )


def _check_size(img: nib.Nifti1Image, path: Path, max_voxels: int) -> None:
    """Refuse a header whose voxel count the file cannot hold, before anything is allocated."""
    voxels = math.prod(int(n) for n in img.shape)
    try:
        itemsize = img.get_data_dtype().itemsize
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: the header's data type is not readable: {exc}") from exc
    check_voxels(voxels, img.shape, f"{path}: header", max_voxels)
    need = voxels * itemsize + int(img.header.get("vox_offset", 0) or 0)
    size = path.stat().st_size
    name = path.name.lower()
    holds = size * GZIP_MAX_RATIO if name.endswith(".gz") else size
    if name.endswith((".nii", ".gz")) and need > holds:
        raise DataError(
            f"{path}: header shape {img.shape} of {img.get_data_dtype()} needs {need} bytes but "
            f"the file ({size} bytes{', gzip' if name.endswith('.gz') else ''}) can hold at most "
            f"{holds}: the header is wrong or the file is truncated"
        )


def _check_affine(img: nib.Nifti1Image, path: Path) -> None:
    """A voxel-to-world matrix that cannot be oriented (zero or non-finite voxel size)."""
    affine = np.asarray(img.affine, dtype=np.float64)
    ok = affine.shape == (4, 4) and bool(np.all(np.isfinite(affine)))
    if ok:
        rotation = affine[:3, :3]
        scale = np.linalg.norm(rotation, axis=0)
        ok = bool(np.all(scale > 1e-6)) and abs(np.linalg.det(rotation)) > 1e-12 * scale.prod()
    if not ok:
        raise DataError(
            f"{path}: the voxel-to-world affine (sform/qform, voxel sizes "
            f"{tuple(float(z) for z in img.header.get_zooms()[:3])}) is singular or not finite; "
            f"expected non-zero voxel sizes and independent axes:\n{np.round(affine, 4)}"
        )


def _canonical(img: nib.Nifti1Image, path: Path) -> nib.Nifti1Image:
    try:
        return nib.as_closest_canonical(img)
    except (nib.orientations.OrientationError, ValueError) as exc:
        raise DataError(f"{path}: cannot orient the volume to RAS: {exc}") from exc


def out_of_memory(path: Path, shape: tuple[int, ...]) -> DataError:
    """The message for a MemoryError while reading ``path`` (not "corrupt": it is the machine)."""
    voxels = math.prod(int(n) for n in shape)
    return DataError(
        f"{path}: not enough memory to read {' x '.join(str(n) for n in shape)} = {voxels} "
        "voxels (MemoryError); free memory, use a larger machine, or lower data.max_voxels to "
        "refuse such volumes up front"
    )


def _data(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return img.get_fdata(dtype=np.float32)
    except MemoryError:
        raise out_of_memory(path, img.shape) from None
    except (*NIFTI_READ_ERRORS, TypeError) as exc:
        raise DataError(f"{path} is truncated or corrupt: {type(exc).__name__}: {exc}") from exc


def load_image(
    path: str | Path, max_voxels: int = MAX_VOXELS
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A CT volume as float32 HU [X, Y, Z] in canonical RAS, with the canonical image (affine)."""
    path = Path(path)
    return canonical_data(open_nifti(path, max_voxels), path)


def canonical_data(img: nib.Nifti1Image, path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """``img`` reoriented to canonical RAS: (float32 voxels [X, Y, Z], the canonical image)."""
    img = _canonical(img, path)
    return _data(img, path), img


HU_LIMIT = 1e5
"""No CT voxel lies beyond +-HU_LIMIT: a value past it is a broken scaling (any format)."""


def replace_nan(image: np.ndarray, path: Path, nan_hu: float | None) -> np.ndarray:
    """NaN voxels are an error (they would poison every slice), or set to ``data.nan_hu``;
    +-Inf voxels, and voxels beyond +-:data:`HU_LIMIT`, are always an error (no HU stands for
    them: a broken scaling, such as a NIfTI ``scl_slope`` of 1e30, or export)."""
    inf = np.isinf(image)
    if inf.any():
        raise DataError(
            f"{path}: {int(inf.sum())} image voxel(s) are infinite (+Inf or -Inf); a CT holds "
            "finite HU: check the file's scaling (scl_slope / RescaleSlope) or its export"
        )
    finite = image[np.isfinite(image)]
    if finite.size and float(np.abs(finite).max()) > HU_LIMIT:
        raise DataError(
            f"{path}: image voxels reach {float(np.abs(finite).max()):g} HU, beyond "
            f"+-{HU_LIMIT:g}: check the file's scaling (scl_slope, scl_inter) or its export"
        )
    nan = np.isnan(image)
    if not nan.any():
        return image
    if nan_hu is None:
        raise DataError(
            f"{path}: {int(nan.sum())} image voxel(s) are NaN; set data.nan_hu (the HU written "
            "over NaN voxels, e.g. -1024 for air) to accept them"
        )
    image = image.copy()
    image[nan] = nan_hu
    return image


def check_label_values(label: np.ndarray, labels: dict[int, str] | None, path: Path) -> None:
    """Every label value must be declared in dataset.json's 'labels' (7 is not "foreground").

    ``labels = None``: the format declares no labels (DICOM); every value 0..255 is accepted.
    """
    if labels is None:
        return
    undeclared = sorted(set(np.unique(label).tolist()) - set(labels))
    if undeclared:
        raise DataError(
            f"{path}: label value(s) {undeclared} are not among the task's declared labels "
            f"{dict(sorted(labels.items()))}; declare them or fix the label file"
        )


def volume_of(case: Case, raw_img: nib.Nifti1Image, raw_lab: nib.Nifti1Image) -> Volume:
    """Pair an opened image and label of ``case`` (same shape and affine) as a canonical Volume."""
    if raw_img.shape != raw_lab.shape:
        raise DataError(
            f"{case.label}: shape {raw_lab.shape} does not match image {case.image} {raw_img.shape}"
        )
    if not np.allclose(raw_img.affine, raw_lab.affine, atol=AFFINE_ATOL):
        raise DataError(
            f"{case.label}: affine does not match image {case.image} (tolerance {AFFINE_ATOL}):\n"
            f"label\n{np.round(raw_lab.affine, 4)}\nimage\n{np.round(raw_img.affine, 4)}"
        )
    image, img = canonical_data(raw_img, case.image)
    lab = _canonical(raw_lab, case.label)
    label = _label_data(lab, case.label)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return Volume(case.case_id, image, label, img.affine.copy(), spacing)  # type: ignore[arg-type]


def _label_data(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)  # keeps an integer on-disk type: no float round trip
    except MemoryError:
        raise out_of_memory(path, img.shape) from None
    except NIFTI_READ_ERRORS as exc:
        raise DataError(f"{path} is truncated or corrupt: {type(exc).__name__}: {exc}") from exc
    if data.dtype.kind not in "biuf":
        raise DataError(f"{path}: label data type {data.dtype} is not numeric")
    if data.dtype.kind == "f" and (not np.all(np.isfinite(data)) or np.any(data != np.round(data))):
        raise DataError(f"{path}: label values must be integers (found non-integer values)")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(
            f"{path}: label values must be integers in 0..255, found {data.min():g}..{data.max():g}"
        )
    return data.astype(np.uint8)


def is_nifti(path: Path) -> bool:
    """Whether ``path`` is a NIfTI file (``.nii``, ``.nii.gz``): one CT for ``predict``."""
    return path.is_file() and path.name.lower().endswith((NIFTI_SUFFIX, ".nii"))
