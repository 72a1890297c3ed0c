"""Test helpers: an MSD task rewritten as an nnU-Net v2 raw dataset and as DICOM series.

``to_nnunet`` copies the NIfTI files byte for byte under nnU-Net's names. ``to_dicom`` writes
each case as a CT series (CT Image Storage, int16 with RescaleSlope 1 / RescaleIntercept -1024,
standard axial orientation, files in shuffled order) next to its label NIfTI, listed in
``series.csv`` with the task's ``sites.json`` as the ``site`` column.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DS

from privseg.data.msd import read_task
from privseg.data.nifti import load_image

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
INTERCEPT = -1024.0


def to_nnunet(msd: Path, out: Path, *, dataset_json: dict | None = None) -> Path:
    """``out`` as ``Dataset001_<name>`` content: imagesTr/{case}_0000.nii.gz, labelsTr/{case}."""
    task = read_task(msd)
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for case in task.cases:
        shutil.copy2(case.image, out / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        shutil.copy2(case.label, out / "labelsTr" / f"{case.case_id}.nii.gz")
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in sorted(task.labels.items())},
        "numTraining": len(task.cases),
        "file_ending": ".nii.gz",
        "name": task.name,
        **(dataset_json or {}),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    if (msd / "sites.json").is_file():
        shutil.copy2(msd / "sites.json", out / "sites.json")
    return out


def to_dicom(msd: Path, out: Path, *, seed: int = 0) -> Path:
    """Every case as ``out/<case>/`` DICOM files plus ``out/labels/<case>.nii.gz``."""
    task = read_task(msd)
    sites = json.loads((msd / "sites.json").read_text())
    (out / "labels").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for case in task.cases:
        hu, img = load_image(case.image)
        write_series(out / case.case_id, hu, img.affine, rng=rng, patient=case.case_id)
        shutil.copy2(case.label, out / "labels" / f"{case.case_id}.nii.gz")
        rows.append([case.case_id, f"labels/{case.case_id}.nii.gz", sites[case.case_id]])
    write_csv(out / "series.csv", [["series", "label", "site"], *rows])
    return out


def write_csv(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def write_series(
    folder: Path,
    hu: np.ndarray,
    affine_ras: np.ndarray,
    *,
    rng: np.random.Generator,
    patient: str = "PHANTOM",
) -> list[Path]:
    """Write integer HU ``[X, Y, Z]`` on ``affine_ras`` as one CT series, standard axial order.

    A canonical (RAS) volume is flipped in x and y so that columns run to the patient's left
    and rows to the back (ImageOrientationPatient 1\\0\\0\\0\\1\\0), as scanners store axial CT.
    Returns the files in slice order; their names are shuffled.
    """
    assert np.array_equal(hu, np.round(hu)), "DICOM stores integer HU"
    nx, ny, nz = hu.shape
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [nx - 1, ny - 1]
    lps = LPS_TO_RAS @ affine_ras @ flip
    data = hu[::-1, ::-1, :]
    col_mm, row_mm = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / col_mm), *(lps[:3, 1] / row_mm)]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    names = rng.permutation(nz)
    files = []
    for k in range(nz):
        position = (lps @ [0.0, 0.0, k, 1.0])[:3]
        stored = (data[:, :, k].T - INTERCEPT).astype(np.int16)
        ds = _slice(stored, study, series, frame, patient)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [DS(v, auto_format=True) for v in position]
        ds.ImageOrientationPatient = [DS(v, auto_format=True) for v in orientation]
        ds.PixelSpacing = [DS(row_mm, auto_format=True), DS(col_mm, auto_format=True)]
        ds.SliceThickness = DS(np.linalg.norm(lps[:3, 2]), auto_format=True)
        ds.SliceLocation = DS(position[2], auto_format=True)
        path = folder / f"IM{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _slice(stored: np.ndarray, study: str, series: str, frame: str, patient: str):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientID = ds.PatientName = patient
    ds.Manufacturer = "privseg test"
    ds.KVP = DS(120)
    ds.SeriesNumber = 2
    ds.PatientPosition = "FFS"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = DS(1), DS(INTERCEPT)
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = DS(40), DS(400)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds
