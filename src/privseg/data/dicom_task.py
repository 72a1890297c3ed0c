"""A folder of CT DICOM series with NIfTI labels, listed in a CSV (``series.csv``).

Columns: ``series`` (a series folder, relative to the CSV's folder), ``label`` (its NIfTI label
file, relative too) and optionally ``site`` (the hospital the patient belongs to: the site
map) and ``series_uid`` (the SeriesInstanceUID to read when the folder holds several). A
case's id is its ``series`` path. The label must lie on the series' voxel grid (same shape,
affine within :data:`~privseg.data.nifti.AFFINE_ATOL` after both are put in the same axis
order), or both files are named in the error.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

import nibabel as nib

from privseg.core.errors import DataError
from privseg.core.output import check_site_name
from privseg.data.dicom import read_dicom_series, series_files
from privseg.data.nifti import MAX_VOXELS, NIFTI_READ_ERRORS, open_nifti, out_of_memory, volume_of
from privseg.data.sites import SITE_MAP_FILE
from privseg.data.task import Case, Reader, Task, Volume, duplicate_ids, task_path

SERIES_CSV = "series.csv"
COLUMNS = ("series", "label")


def read_dicom_task(src: Path) -> Task:
    """``src`` is the CSV itself or a folder holding ``series.csv``; paths are relative to its
    folder."""
    index = src if src.is_file() else src / SERIES_CSV
    root = index.parent
    if not index.is_file():
        raise DataError(f"{index} is missing: a DICOM folder needs a {SERIES_CSV}")
    try:
        with index.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{index} is not a readable CSV file: {exc}") from exc
    if not set(COLUMNS) <= set(header):
        raise DataError(
            f"{index}: header {header} lacks column(s) "
            f"{sorted(set(COLUMNS) - set(header))}; expected 'series,label' (and optional "
            "'site', 'series_uid')"
        )
    cases, sites = [], {}
    for line, row in enumerate(rows, start=2):
        row = {str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None}
        where = f"{index} line {line}"
        series = task_path(root, row["series"], f"{where}: series", "patient01/ct")
        label = task_path(root, row["label"], f"{where}: label", "labels/patient01.nii.gz")
        if not series.is_dir():
            raise DataError(f"{where}: series folder {series} does not exist")
        if not label.is_file():
            raise DataError(f"{where}: label file {label} does not exist (series {series})")
        case_id = str(PurePosixPath(*series.relative_to(root).parts))
        uid = row.get("series_uid") or None  # a folder holding several series: which one
        cases.append(Case(case_id=case_id, image=series, label=label, series=uid))
        if "site" in header:
            sites[case_id] = check_site_name(row.get("site", ""), f"{where}: site")
    if not cases:
        raise DataError(f"{index}: no rows; expected one line per series")
    dupes = duplicate_ids(cases)
    if dupes:
        raise DataError(f"{index}: series listed twice: {dupes}")
    if sites and (root / SITE_MAP_FILE).is_file():
        raise DataError(
            f"{index} has a 'site' column and {root / SITE_MAP_FILE} also maps patients to "
            "sites: keep one of the two"
        )
    return Task(root, root.name, None, cases, index=index, site_map=sites or None)


def load_dicom_case(case: Case, max_voxels: int = MAX_VOXELS) -> Volume:
    """The series and its label as a canonical Volume; the label must share the series' grid."""
    hu, affine = read_dicom_series(case.image, max_voxels, case.series)
    image = nib.Nifti1Image(hu, affine)
    label = open_nifti(case.label, max_voxels)
    # A label tool may store the same grid in another axis order (e.g. RAS vs LPS): compare
    # the two in the series' order.
    turn = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(label.affine), nib.orientations.io_orientation(affine)
    )
    try:
        label = label.as_reoriented(turn)
    except MemoryError:
        raise out_of_memory(case.label, label.shape) from None
    except NIFTI_READ_ERRORS as exc:
        raise DataError(
            f"{case.label} is truncated or corrupt: {type(exc).__name__}: {exc}"
        ) from exc
    return volume_of(case, image, label)


def _is_task(path: Path) -> bool:
    """The CSV itself, or a folder holding ``series.csv``."""
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return (path / SERIES_CSV).is_file()


def _read_series(folder: Path, max_voxels: int, series: str | None = None) -> nib.Nifti1Image:
    """One series for ``predict``, on its own voxel grid (as dicom2nifti would write it)."""
    hu, affine = read_dicom_series(folder, max_voxels, series)
    return nib.Nifti1Image(hu, affine)


READER = Reader(
    finds=_is_task,
    read_task=read_dicom_task,
    load_case=load_dicom_case,
    image_files=series_files,
    is_ct=Path.is_dir,
    read_ct=_read_series,
)
