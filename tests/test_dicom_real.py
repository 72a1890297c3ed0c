"""Issue 27: real DICOM as hospitals export it, from files no one here wrote (pydicom's own
test files and the pydicom-data package): compressed transfer syntaxes, an empty SOP class
element, a localizer and a dose report beside the series, several series in one folder,
gantry tilt, other modalities."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import data_store
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from conftest import Bright
from privseg.cli.app import app
from privseg.config import Config
from privseg.core.errors import DataError
from privseg.data.dicom import read_dicom_series
from privseg.models import build_model
from privseg.models.checkpoint import save_checkpoint

STORE = Path(data_store.__file__).parent / "data"
PYDICOM = Path(pydicom.__file__).parent / "data" / "test_files"
# Single-frame CT Image Storage files shipped by the packages, by transfer syntax.
CT_FILES = {
    "693_J2KR.dcm": "JPEG 2000 (lossless)",
    "693_J2KI.dcm": "JPEG 2000 (lossy)",
    "693_UNCR.dcm": "explicit VR little endian",
    "bad_sequence.dcm": "JPEG lossless, process 14 SV1",
    "explicit_VR-UN.dcm": "JPEG 2000 (lossless)",
    "CT_small.dcm": "explicit VR little endian",
}
REFUSED = {"MR2_J2KR.dcm": "MR Image Storage", "eCT_Supplemental.dcm": "Enhanced CT Image Storage"}


def _real(name: str) -> Path:
    return STORE / name if (STORE / name).is_file() else PYDICOM / name


def _series(
    source: Path, folder: Path, n: int = 4, *, tilt_mm: float = 0.0, **tags: object
) -> Path:
    """``n`` slices of one real file, stepped along its slice normal (pixel data untouched,
    still in the file's own transfer syntax)."""
    folder.mkdir(parents=True)
    uid = generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(source)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        position = position + k * 2.5 * normal + k * tilt_mm * orientation[:3]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(folder / f"IM{k:04d}.dcm")
    return folder


@pytest.mark.parametrize("name", sorted(CT_FILES))
def test_every_shipped_ct_transfer_syntax_is_read(name: str, tmp_path: Path) -> None:
    source = _real(name)
    hu, affine = read_dicom_series(_series(source, tmp_path / "s"))
    ds = pydicom.dcmread(source)
    assert hu.shape == (int(ds.Columns), int(ds.Rows), 4)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    expected = ds.pixel_array.T.astype(np.float64) * slope + intercept
    assert np.allclose(hu[..., 0], expected)
    assert np.allclose(np.abs(np.diag(affine)[:2]), [float(v) for v in ds.PixelSpacing][::-1])


def test_lossless_jpeg2000_decodes_to_the_uncompressed_voxels(tmp_path: Path) -> None:
    compressed, _ = read_dicom_series(_series(_real("693_J2KR.dcm"), tmp_path / "j2k"))
    plain, _ = read_dicom_series(_series(_real("693_UNCR.dcm"), tmp_path / "raw"))
    assert np.array_equal(compressed, plain)


@pytest.mark.parametrize(("name", "sop"), sorted(REFUSED.items()))
def test_other_objects_are_refused_by_name(name: str, sop: str, tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    shutil.copy(_real(name), folder / name)
    with pytest.raises(DataError, match=rf"{name}: SOP class .*{sop}"):
        read_dicom_series(folder)


def _pacs_folder(tmp_path: Path) -> Path:
    """A PACS export: JPEG 2000 slices whose SOPClassUID element is empty (the file meta
    names CT Image Storage), a localizer and a dose report without pixels beside them."""
    folder = _series(_real("693_J2KR.dcm"), tmp_path / "pacs", SOPClassUID="")
    scout = pydicom.dcmread(folder / "IM0000.dcm")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    scout.SeriesInstanceUID = scout.SOPInstanceUID = generate_uid()
    scout.save_as(folder / "SCOUT.dcm")
    report = pydicom.dcmread(folder / "IM0001.dcm")
    del report.PixelData
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    report.SeriesInstanceUID = generate_uid()
    report.save_as(folder / "DOSE.dcm")
    return folder


def test_a_pacs_export_is_read_and_what_was_skipped_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _pacs_folder(tmp_path)
    assert pydicom.dcmread(folder / "IM0000.dcm").SOPClassUID == ""
    with caplog.at_level(logging.WARNING, logger="privseg.data.dicom"):
        hu, _ = read_dicom_series(folder)
    assert hu.shape == (512, 512, 4)
    assert "SCOUT.dcm (localizer)" in caplog.text and "DOSE.dcm (no pixel data" in caplog.text


def test_a_pacs_export_predicts_end_to_end(tmp_path: Path) -> None:
    cfg = Config().with_overrides(["data.resolution=32", "model.features=4"])
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, build_model(cfg.model, cfg.data.n_classes).state_dict(), cfg)
    folder, out = _pacs_folder(tmp_path), tmp_path / "mask.nii.gz"
    args = ["predict", "--checkpoint", checkpoint, "--image", folder, "--out", out]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert nib.load(out).shape == (512, 512, 4)


def test_several_series_are_listed_and_one_can_be_chosen(tmp_path: Path) -> None:
    folder = _series(_real("693_UNCR.dcm"), tmp_path / "s", SeriesDescription="venous")
    other = _series(_real("CT_small.dcm"), tmp_path / "t", n=3, SeriesDescription="arterial")
    for path in other.iterdir():
        shutil.move(path, folder / f"B{path.name}")
    uid = str(pydicom.dcmread(folder / "BIM0000.dcm").SeriesInstanceUID)
    with pytest.raises(DataError, match="holds 2 series") as refused:
        read_dicom_series(folder)
    assert f"{uid} (arterial, 3 file(s))" in str(refused.value)
    assert "(venous, 4 file(s))" in str(refused.value)
    hu, _ = read_dicom_series(folder, series=uid)
    assert hu.shape == (128, 128, 3)
    with pytest.raises(DataError, match="holds no series 'nope'"):
        read_dicom_series(folder, series="nope")
    cfg = Config().with_overrides(["data.resolution=32", "model.features=4"])
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, build_model(cfg.model, cfg.data.n_classes).state_dict(), cfg)
    args = ["predict", "--checkpoint", checkpoint, "--image", folder]
    for extra, code in (([], 2), (["--series", uid], 0)):
        out = tmp_path / f"mask{len(extra)}.nii.gz"
        result = CliRunner().invoke(app, [str(a) for a in [*args, "--out", out, *extra]])
        assert result.exit_code == code, result.output
    assert nib.load(out).shape == (128, 128, 3)


def test_gantry_tilt_is_refused_beyond_the_tolerance(tmp_path: Path) -> None:
    source = _real("693_UNCR.dcm")
    read_dicom_series(_series(source, tmp_path / "slight", tilt_mm=0.01))  # 0.2 degrees
    with pytest.raises(DataError, match=r"5\.\d\d degrees off their normal \(gantry tilt\)"):
        read_dicom_series(_series(source, tmp_path / "tilted", tilt_mm=0.2187))


def test_series_csv_chooses_a_series_by_uid(tmp_path: Path) -> None:
    from privseg.data.dicom_task import load_dicom_case
    from privseg.data.sources import read_source

    root = tmp_path / "task"
    folder = _series(_real("CT_small.dcm"), root / "p1", n=3)
    for path in _series(_real("693_UNCR.dcm"), tmp_path / "other").iterdir():
        shutil.move(path, folder / f"B{path.name}")
    uid = str(pydicom.dcmread(folder / "IM0000.dcm").SeriesInstanceUID)
    hu, affine = read_dicom_series(folder, series=uid)
    (root / "labels").mkdir()
    nib.save(nib.Nifti1Image((hu > 0).astype(np.uint8), affine), root / "labels" / "p1.nii.gz")
    (root / "series.csv").write_text("series,label\np1,labels/p1.nii.gz\n")
    with pytest.raises(DataError, match="holds 2 series"):
        load_dicom_case(read_source(root).cases[0])
    (root / "series.csv").write_text(f"series,label,series_uid\np1,labels/p1.nii.gz,{uid}\n")
    volume = load_dicom_case(read_source(root).cases[0])
    assert volume.image.shape == (128, 128, 3)


def test_a_dicom_seg_overlays_the_nifti_mask_voxel_for_voxel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`predict --format dicom-seg`: highdicom reads the object back, it references the source
    series, and its frames are the NIfTI mask of the same prediction."""
    import highdicom as hd

    import privseg.models.checkpoint as ckpt

    cfg = Config().with_overrides(["data.resolution=32", "model.features=4"])
    cfg = cfg.replace(**{"data.classes": {"liver": [1]}})
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, build_model(cfg.model, cfg.data.n_classes).state_dict(), cfg)
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda p: (Bright(), cfg, {}))
    folder = _series(_real("CT_small.dcm"), tmp_path / "ct", n=3)
    base = ["predict", "--checkpoint", checkpoint, "--image", folder]
    nifti, seg_path = tmp_path / "mask.nii.gz", tmp_path / "mask.dcm"
    for args in ([*base, "--out", nifti], [*base, "--out", seg_path, "--format", "dicom-seg"]):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    seg = hd.seg.segread(seg_path)
    sources = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    assert seg.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    mask = np.asarray(nib.load(nifti).dataobj) > 0  # [X, Y, Z] on the series' grid
    order = sorted(sources, key=lambda s: float(s.ImagePositionPatient[2]))
    uids = [str(s.SOPInstanceUID) for s in order]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True
    )  # [Z, rows, columns, 1]
    assert 0 < mask.sum() < mask.size
    assert np.array_equal(frames[..., 0].astype(bool), np.transpose(mask, (2, 1, 0)))


def test_dicom_seg_needs_a_dicom_series(tmp_path: Path, phantom_dir: Path) -> None:
    from privseg.data.msd import read_task

    cfg = Config().with_overrides(["data.resolution=32", "model.features=4"])
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, build_model(cfg.model, cfg.data.n_classes).state_dict(), cfg)
    image = read_task(phantom_dir).cases[0].image
    args = ["predict", "--checkpoint", checkpoint, "--image", image, "--format", "dicom-seg"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--out", tmp_path / "m.dcm"]])
    assert result.exit_code == 2 and "is not a DICOM series folder" in result.output
