"""One file of a CT DICOM series: read, its geometry and rescale checked, pixels in HU.

A file privseg reads is single-frame CT Image Storage (the SOP class taken from the file meta
when the dataset's element is empty, as PACS exports leave it). A localizer or an object
without pixel data is not an error but a reason to skip the file (:func:`read_slice` returns
it); anything else that would give a wrong volume is a DataError naming the file and tag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from privseg.core.errors import DataError
from privseg.data.nifti import HU_LIMIT

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Bounds that no scanner reaches (a 10 km field of view, a 1 m pixel): beyond them a tag is
# corrupt, and the arithmetic on it would only fail later with a misleading message.
MAX_POSITION_MM = 1e7
MAX_SPACING_MM = 1e3
_REQUIRED = (
    "SeriesInstanceUID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "PixelData",
)
# Errors pydicom raises on a file that is not DICOM, is truncated, or has malformed values.
READ_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
)
# Decoding pixel data goes through pluggable decoders (numpy, pylibjpeg, GDCM, ...): a missing
# decoder raises RuntimeError/NotImplementedError, a corrupt stream anything of these.
DECODE_ERRORS = (*READ_ERRORS, RuntimeError, NotImplementedError, MemoryError)


@dataclass(frozen=True)
class Slice:
    """One file's geometry and rescale, checked; pixels are decoded later."""

    path: Path
    dataset: pydicom.Dataset
    series_uid: str
    orientation: np.ndarray  # [6]: row cosine, column cosine (LPS)
    position: np.ndarray  # [3]: centre of the first pixel (LPS, mm)
    shape: tuple[int, int]  # (Rows, Columns)
    pixel_spacing: np.ndarray  # [2]: between rows, between columns (mm)
    slope: float
    intercept: float


def read_slice(path: Path) -> Slice | str:
    """One CT image file, checked; or why it is skipped (a localizer, no pixel data)."""
    try:
        ds = pydicom.dcmread(path)
    except READ_ERRORS as exc:
        raise DataError(
            f"{path} is not a readable DICOM file: {type(exc).__name__}: {exc}"
        ) from exc
    # PACS exports may leave the dataset's element empty: the file meta names the class too
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    if "PixelData" not in ds and sop != CT_IMAGE_STORAGE:
        return f"no pixel data: {sop_name(sop)}"
    if sop != CT_IMAGE_STORAGE:
        raise DataError(
            f"{path}: SOP class {sop_name(sop)}; privseg reads series of single-frame CT Image "
            f"Storage ({CT_IMAGE_STORAGE}) files"
        )
    kinds = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in kinds:
        return "localizer"
    missing = [key for key in _REQUIRED if key not in ds]
    if missing:
        raise DataError(f"{path}: DICOM attribute(s) {', '.join(missing)} missing")
    try:
        planes = int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("SamplesPerPixel", 1))
        slice_ = Slice(
            path=path,
            dataset=ds,
            series_uid=str(ds.SeriesInstanceUID),
            orientation=_floats(ds.ImageOrientationPatient, 6),
            position=_floats(ds.ImagePositionPatient, 3),
            shape=(int(ds.Rows), int(ds.Columns)),
            pixel_spacing=_floats(ds.PixelSpacing, 2),
            slope=number(ds, "RescaleSlope", 1.0, path),
            intercept=number(ds, "RescaleIntercept", 0.0, path),
        )
    except READ_ERRORS as exc:
        raise DataError(f"{path}: malformed DICOM attribute: {type(exc).__name__}: {exc}") from exc
    if planes != 1:
        raise DataError(f"{path}: multi-frame or multi-sample images are not supported")
    check_slice(slice_)
    return slice_


def sop_name(sop: object) -> str:
    return f"{sop} ({pydicom.uid.UID(str(sop)).name})" if sop else "missing"


def number(ds: pydicom.Dataset, tag: str, default: float, path: Path) -> float:
    """A numeric (DS/IS) tag as a finite float, ``default`` when absent or empty; anything else
    ("abc", "1e999", a list where one number belongs) is a DataError naming file and tag."""
    try:
        raw = ds.get(tag)
    except READ_ERRORS as exc:  # pydicom parses DS/IS values when they are first read
        raise DataError(f"{path}: DICOM tag {tag} is not a number: {exc}") from exc
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{path}: DICOM tag {tag} = {raw!r} is not a finite number")
    return value


def _floats(value: object, n: int) -> np.ndarray:
    out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    if out.shape != (n,):
        raise ValueError(f"expected {n} numbers, got {len(out)}")
    return out


def check_slice(s: Slice) -> None:
    numbers = [*s.orientation, *s.position, *s.pixel_spacing, s.slope, s.intercept]
    if not all(math.isfinite(v) for v in numbers):
        raise DataError(f"{s.path}: geometry or rescale values are not finite")
    row, col = s.orientation[:3], s.orientation[3:]
    unit = abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3
    if not unit or abs(float(row @ col)) > 1e-3:
        raise DataError(
            f"{s.path}: ImageOrientationPatient {list(s.orientation)} is not two orthogonal "
            "unit vectors"
        )
    if np.any(np.abs(s.position) > MAX_POSITION_MM):
        raise DataError(
            f"{s.path}: ImagePositionPatient {list(s.position)} lies beyond +-{MAX_POSITION_MM:g}"
            " mm of the scanner's origin: the geometry tags are wrong"
        )
    if np.any(s.pixel_spacing > MAX_SPACING_MM):
        raise DataError(
            f"{s.path}: PixelSpacing {list(s.pixel_spacing)} exceeds {MAX_SPACING_MM:g} mm per "
            "pixel: the geometry tags are wrong"
        )
    if min(s.shape) < 1 or np.any(s.pixel_spacing <= 0) or s.slope == 0:
        raise DataError(
            f"{s.path}: Rows/Columns {s.shape}, PixelSpacing {list(s.pixel_spacing)} or "
            f"RescaleSlope {s.slope} is invalid (expected positive sizes and a non-zero slope)"
        )


def slice_hu(s: Slice) -> np.ndarray:
    """The slice in HU, float32 [Rows, Columns]."""
    try:
        pixels = s.dataset.pixel_array
    except DECODE_ERRORS as exc:
        syntax = getattr(getattr(s.dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(
            f"{s.path}: pixel data cannot be decoded (transfer syntax {syntax}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if pixels.shape != s.shape:
        raise DataError(f"{s.path}: pixel data shape {pixels.shape}, Rows/Columns say {s.shape}")
    hu = pixels.astype(np.float64) * s.slope + s.intercept
    low, high = (float(hu.min()), float(hu.max())) if hu.size else (0.0, 0.0)
    if not (low >= -HU_LIMIT and high <= HU_LIMIT):
        raise DataError(
            f"{s.path}: RescaleSlope {s.slope:g} and RescaleIntercept {s.intercept:g} give HU "
            f"{low:g}..{high:g}, beyond +-{HU_LIMIT:g}: the rescale tags are wrong"
        )
    return hu.astype(np.float32)
