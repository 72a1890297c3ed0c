"""Read one CT DICOM series (a folder of single-frame CT Image Storage files) as a volume.

Geometry, as nibabel's ``nicom`` and dicom2nifti build it: voxel ``[i, j, k]`` is column ``i``,
row ``j`` of the ``k``-th slice, slices sorted by ImagePositionPatient projected on the slice
normal (row cosine x column cosine, from ImageOrientationPatient). In DICOM's patient frame
(LPS: +x left, +y posterior, +z head) its centre is

    IPP_0 + i * PixelSpacing[1] * row_cosine + j * PixelSpacing[0] * column_cosine + k * step

with ``step`` the mean slice-to-slice offset. NIfTI's world frame is RAS (+x right, +y
anterior), so the affine returned is ``diag(-1, -1, 1, 1) @ lps_affine``. HU are
``stored value * RescaleSlope + RescaleIntercept`` of each slice.

Folders as a PACS exports them are read: compressed pixel data (every transfer syntax the
installed decoders handle: GDCM, OpenJPEG, RLE), a SOP class given only in the file meta, and
localizer (scout) images and objects without pixel data (dose reports) beside the series,
which are skipped and named in the log. A folder with several series is read when one is
chosen (``series``: its SeriesInstanceUID); else the series are listed.

Everything that would give a wrong volume is a :class:`~privseg.core.errors.DataError` naming the
series folder (and the files): orientation, size or pixel spacing differing within a series,
two slices at one position, a gap where slices are missing, slices off one line, gantry tilt,
non-CT or multi-frame objects, pixel data that cannot be decoded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from privseg.core.errors import DataError
from privseg.data.dicom_file import MAX_SPACING_MM, Slice, number, read_slice, slice_hu
from privseg.data.nifti import MAX_VOXELS, canonical_data, check_voxels, out_of_memory

log = logging.getLogger(__name__)

# A tilted gantry shears the slices: the step between them leaves the slice normal. Up to this
# angle the shear is below 0.1 mm per 10 mm of slice offset; beyond it privseg refuses.
MAX_TILT_DEGREES = 0.5
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Direction cosines and pixel spacings are written as decimal strings (DS, 16 characters):
# files of one series agree to ~1e-6; 1e-4 separates a different series from rounding.
GEOMETRY_ATOL = 1e-4
# A slice-to-slice step may differ from the series' median step by this fraction: a missing
# slice doubles one step (+100 %), a duplicate makes one 0; scanners' position jitter is
# < 0.01 mm, under 1 % of any clinical slice spacing (>= 0.5 mm).
STEP_RTOL = 0.05


def series_files(folder: Path) -> list[Path]:
    """The files of a series folder (hidden files skipped), sorted by name."""
    if not folder.is_dir():
        raise DataError(f"DICOM series folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"DICOM series folder {folder} holds no files")
    return files


def read_dicom_series(
    folder: str | Path, max_voxels: int = MAX_VOXELS, series: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A CT series folder -> (HU float32 ``[X, Y, Z]`` in the series' voxel order, RAS affine).

    X runs along a row (column index), Y down the columns (row index), Z over the slices in
    the direction of the slice normal. The affine maps voxel indices to RAS mm, as a NIfTI
    written by dicom2nifti from the same series would. ``series``: the SeriesInstanceUID to
    read from a folder that holds several.
    """
    folder = Path(folder)
    slices, step = _sorted_series(folder, series, max_voxels)
    first = slices[0]
    rows, cols = first.shape
    shape = (cols, rows, len(slices))
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * first.pixel_spacing[1]
    lps[:3, 1] = col_cos * first.pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = slices[0].position  # the first slice along the normal
    try:
        hu = np.stack([slice_hu(s).T for s in slices], axis=-1)
    except MemoryError:
        raise out_of_memory(folder, shape) from None
    return hu, LPS_TO_RAS @ lps


def series_datasets(folder: str | Path, series: str | None = None) -> list[pydicom.Dataset]:
    """The series' files as datasets, in the order of the volume's slices (its Z axis): what
    a DICOM Segmentation of the volume references, frame by frame."""
    return [s.dataset for s in _sorted_series(Path(folder), series, MAX_VOXELS)[0]]


def _sorted_series(
    folder: Path, series: str | None, max_voxels: int
) -> tuple[list[Slice], np.ndarray]:
    """The chosen series' slices, checked and sorted along the normal, and the step (LPS mm)."""
    slices = _pick_series(folder, _series_slices(folder), series)
    _check_one_series(folder, slices)
    rows, cols = slices[0].shape
    shape = (cols, rows, len(slices))
    check_voxels(cols * rows * len(slices), shape, f"DICOM series {folder}: series", max_voxels)
    normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
    slices.sort(key=lambda s: float(s.position @ normal))
    step = _slice_step(folder, slices, normal)
    _check_tilt(folder, step, normal)
    return slices, step


def _series_slices(folder: Path) -> list[Slice]:
    """The CT image files of a folder; localizers and objects without pixels skipped, named."""
    slices, skipped = [], []
    for path in series_files(folder):
        read = read_slice(path)
        if isinstance(read, str):
            skipped.append(f"{path.name} ({read})")
        else:
            slices.append(read)
    if skipped:
        log.warning(
            "DICOM folder %s: skipped %d file(s): %s", folder, len(skipped), ", ".join(skipped)
        )
    if not slices:
        raise DataError(
            f"DICOM series folder {folder} holds no CT image: skipped {', '.join(skipped)}"
        )
    return slices


def _pick_series(folder: Path, slices: list[Slice], series: str | None) -> list[Slice]:
    """The slices of the chosen series; several series without a choice are listed."""
    found: dict[str, list[Slice]] = {}
    for s in slices:
        found.setdefault(s.series_uid, []).append(s)
    if series is not None:
        if series not in found:
            raise DataError(
                f"DICOM folder {folder} holds no series {series!r}; it holds: {_listing(found)}"
            )
        return found[series]
    if len(found) > 1:
        raise DataError(
            f"DICOM folder {folder} holds {len(found)} series: {_listing(found)}; choose one "
            "by its SeriesInstanceUID (predict --series, or a series_uid column in series.csv)"
        )
    return slices


def _listing(found: dict[str, list[Slice]]) -> str:
    def about(s: Slice) -> str:
        return str(s.dataset.get("SeriesDescription", "") or "no description")

    return "; ".join(f"{uid} ({about(s[0])}, {len(s)} file(s))" for uid, s in found.items())


def _check_tilt(folder: Path, step: np.ndarray, normal: np.ndarray) -> None:
    cosine = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-12)
    angle = math.degrees(math.acos(min(1.0, cosine)))
    if angle > MAX_TILT_DEGREES:
        raise DataError(
            f"DICOM series folder {folder}: the slices step {angle:.2f} degrees off their normal "
            f"(gantry tilt); privseg reads series tilted by at most {MAX_TILT_DEGREES} degrees: "
            "resample the series to an untilted grid first"
        )


def load_dicom_image(
    folder: str | Path, max_voxels: int = MAX_VOXELS, series: str | None = None
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """What :func:`~privseg.data.nifti.load_image` gives for a NIfTI, for a DICOM series folder:
    float32 HU ``[X, Y, Z]`` in canonical RAS and the canonical image (its affine)."""
    folder = Path(folder)
    hu, affine = read_dicom_series(folder, max_voxels, series)
    return canonical_data(nib.Nifti1Image(hu, affine), folder)


def _check_one_series(folder: Path, slices: list[Slice]) -> None:
    """All files of the series lie on one in-plane grid; else name two files that differ."""
    first = slices[0]
    checks = (
        ("Rows/Columns", lambda s: s.shape, lambda a, b: a == b),
        ("ImageOrientationPatient", lambda s: s.orientation, _close),
        ("PixelSpacing", lambda s: s.pixel_spacing, _close),
    )
    for name, get, same in checks:
        for s in slices[1:]:
            if not same(get(first), get(s)):
                raise DataError(
                    f"DICOM series folder {folder}: files of one series disagree: "
                    f"{first.path.name} has {name} {_show(get(first))}, {s.path.name} has "
                    f"{_show(get(s))}; a series privseg reads has one in-plane grid"
                )


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=0.0, atol=GEOMETRY_ATOL))


def _show(value: object) -> str:
    if isinstance(value, np.ndarray):
        return str([round(float(v), 6) for v in value])
    return repr(value)


def _slice_step(folder: Path, slices: list[Slice], normal: np.ndarray) -> np.ndarray:
    """The offset (LPS mm) from one slice to the next; refuses duplicates, gaps, stray slices."""
    if len(slices) == 1:
        s = slices[0]
        between = number(s.dataset, "SpacingBetweenSlices", 0.0, s.path)
        thickness = between if between > 0 else number(s.dataset, "SliceThickness", 0.0, s.path)
        if thickness > MAX_SPACING_MM:
            raise DataError(
                f"{s.path}: SpacingBetweenSlices/SliceThickness {thickness:g} exceeds "
                f"{MAX_SPACING_MM:g} mm: the geometry tags are wrong"
            )
        return normal * (thickness if thickness > 0 else 1.0)
    along = np.array([float(s.position @ normal) for s in slices])
    gaps = np.diff(along)
    median = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        a, b = slices[i].path.name, slices[i + 1].path.name
        if gap <= STEP_RTOL * median or median <= 0:
            raise DataError(
                f"DICOM series folder {folder}: {a} and {b} are at the same position "
                f"({along[i]:.3f} mm along the slice normal): a duplicate slice"
            )
        if abs(gap - median) > STEP_RTOL * median:
            raise DataError(
                f"DICOM series folder {folder}: {gap:.3f} mm between {a} and {b} where the "
                f"series steps {median:.3f} mm: the series is incomplete (a slice is missing) "
                "or irregularly spaced"
            )
    step = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    for k, s in enumerate(slices):
        off = float(np.linalg.norm(s.position - slices[0].position - k * step))
        if off > STEP_RTOL * median:
            raise DataError(
                f"DICOM series folder {folder}: {s.path.name} lies {off:.3f} mm off the line "
                "through the other slices' positions"
            )
    return step
