"""nnU-Net v2 datasets and DICOM series give the same slice cache as the MSD task they were
converted from; every bad input is a DataError naming the file or field (CLI exit 2)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.config import Config, DataConfig
from privseg.core.errors import DataError
from privseg.data.cache import SliceCache
from privseg.data.dicom import load_dicom_image, read_dicom_series
from privseg.data.msd import read_task
from privseg.data.nifti import load_image
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache, resolve_cache
from privseg.data.sites import SPLITS
from privseg.data.sources import read_source
from task_formats import to_dicom, to_nnunet, write_csv, write_series

runner = CliRunner()


def assert_same_cache(a: SliceCache, b: SliceCache) -> None:
    """Same sites, splits, patients and arrays (bit for bit), native labels and grids."""
    assert a.sites == b.sites
    for site in a.sites:
        for split in SPLITS:
            x, y = a.split(site, split), b.split(site, split)
            assert x.patient_ids == y.patient_ids
            for name in ("images", "labels", "patient", "z"):
                u, v = np.asarray(getattr(x, name)), np.asarray(getattr(y, name))
                assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), (site, split, name)
            for pid in x.patient_ids:
                g, h = x.native[pid], y.native[pid]
                assert g.shape == h.shape and g.plane == h.plane
                assert np.allclose(g.spacing, h.spacing, rtol=1e-9, atol=0)
                if g.label_path is not None:
                    assert np.array_equal(g.label(), h.label())
    assert a.counts() == b.counts()


def test_nnunet_dataset_gives_the_msd_cache_bit_for_bit(
    phantom_dir: Path, phantom_cache: SliceCache, tmp_path: Path
) -> None:
    nnunet = to_nnunet(phantom_dir, tmp_path / "Dataset001_Phantom")
    task = read_source(nnunet)
    assert task.kind == "nnunet" and task.labels == read_task(phantom_dir).labels
    cache = prepare_cache(nnunet, tmp_path / "cache", DataConfig(resolution=32), seed=0)
    assert_same_cache(phantom_cache, cache)


def test_dicom_series_give_the_msd_cache_bit_for_bit(
    phantom_dir: Path, phantom_cache: SliceCache, tmp_path: Path
) -> None:
    """The phantom's HU are integers, stored as int16 with slope 1 and intercept -1024: the
    HU read back are exact, so the cache is identical (a float HU source would be rounded to
    the nearest integer, at most 0.5 HU)."""
    dicom = to_dicom(phantom_dir, tmp_path / "dicom")
    task = read_source(dicom)
    assert task.kind == "dicom" and task.site_map == json.loads(
        (phantom_dir / "sites.json").read_text()
    )
    cache = prepare_cache(dicom, tmp_path / "cache", DataConfig(resolution=32), seed=0)
    assert_same_cache(phantom_cache, cache)
    # The CSV itself is an input too, and a folder with one is detected by `privseg run`.
    cfg = Config().replace(**{"data.resolution": 32})
    again = resolve_cache(dicom / "series.csv", cfg, tmp_path / "cache")
    assert again.reused


def test_dicom_geometry_matches_the_nifti_it_came_from(phantom_dir: Path, tmp_path: Path) -> None:
    """Standard axial files (columns to the left, rows to the back) read as RAS: the affine
    flips x and y of DICOM's LPS, and the canonical volume equals the NIfTI's."""
    case = read_task(phantom_dir).cases[1]
    hu, img = load_image(case.image)
    files = write_series(tmp_path / "s", hu, img.affine, rng=np.random.default_rng(1))
    ds = pydicom.dcmread(files[0])
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    raw, affine = read_dicom_series(tmp_path / "s")
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    assert np.array_equal(raw, hu[::-1, ::-1, :])
    first = np.array([float(v) for v in ds.ImagePositionPatient])
    assert np.allclose(affine[:3, 3], [-first[0], -first[1], first[2]])
    canonical, canonical_img = load_dicom_image(tmp_path / "s")
    assert np.array_equal(canonical, hu) and np.allclose(canonical_img.affine, img.affine)


def test_real_ct_round_trips_through_dicom(real_msd_dir: Path, tmp_path: Path) -> None:
    for case in read_task(real_msd_dir).cases:
        hu, img = load_image(case.image)
        write_series(tmp_path / case.case_id, hu, img.affine, rng=np.random.default_rng(0))
        back, back_img = load_dicom_image(tmp_path / case.case_id)
        assert np.array_equal(back, hu) and np.allclose(back_img.affine, img.affine, atol=1e-6)


# ---- bad inputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "task"
    return synth_task(root, sites=1, patients_per_site=3, size=16, slices=4)


def _series(root: Path, case: str = "liver_001") -> list[Path]:
    """The case's files in slice order (by ImagePositionPatient z)."""
    files = sorted((root / case).iterdir())
    return sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def _edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _other_series(root: Path) -> None:
    _edit(_series(root)[1], SeriesInstanceUID=pydicom.uid.generate_uid())


def _other_spacing(root: Path) -> None:
    _edit(_series(root)[2], PixelSpacing=[1.0, 1.0])


def _other_orientation(root: Path) -> None:
    _edit(_series(root)[2], ImageOrientationPatient=[0, 1, 0, 1, 0, 0])


def _missing_slice(root: Path) -> None:
    _series(root)[1].unlink()


def _duplicate_position(root: Path) -> None:
    files = _series(root)
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(files[1].with_name("IMdup.dcm"))


def _not_dicom(root: Path) -> None:
    (root / "liver_001" / "notes.txt").write_text("scanned on Tuesday")


def _label_one_slice_less(root: Path) -> None:
    path = root / "labels" / "liver_001.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), path)


def _label_shifted(root: Path) -> None:
    path = root / "labels" / "liver_001.nii.gz"
    img = nib.load(path)
    affine = img.affine.copy()
    affine[2, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), path)


def _csv_missing_series(root: Path) -> None:
    rows = (root / "series.csv").read_text().replace("liver_001,", "liver_099,", 1)
    (root / "series.csv").write_text(rows)


def _csv_outside(root: Path) -> None:
    write_csv(root / "series.csv", [["series", "label"], ["../x", "labels/liver_000.nii.gz"]])


def _csv_no_label_column(root: Path) -> None:
    write_csv(root / "series.csv", [["series", "site"], ["liver_000", "a"]])


DICOM_ERRORS: list[tuple[Callable[[Path], None], tuple[str, ...]]] = [
    (_other_series, ("liver_001", "holds 2 series", "SeriesInstanceUID")),
    (_other_spacing, ("liver_001", "files of one series disagree", "PixelSpacing")),
    (_other_orientation, ("liver_001", "files of one series disagree", "ImageOrientationPatient")),
    (_missing_slice, ("liver_001", "incomplete")),
    (_duplicate_position, ("liver_001", "duplicate", "IMdup.dcm")),
    (_not_dicom, ("liver_001/notes.txt", "not a readable DICOM")),
    (_label_one_slice_less, ("labels/liver_001.nii.gz", "shape", "liver_001")),
    (_label_shifted, ("labels/liver_001.nii.gz", "affine", "liver_001")),
    (_csv_missing_series, ("series.csv line 3", "liver_099", "does not exist")),
    (_csv_outside, ("series.csv line 2", "'../x'", "relative path")),
    (_csv_no_label_column, ("series.csv", "'label'")),
]


def _numtraining(root: Path) -> None:
    _dataset_json(root, numTraining=5)


def _two_channels(root: Path) -> None:
    _dataset_json(root, channel_names={"0": "CT", "1": "PET"})


def _second_channel_file(root: Path) -> None:
    shutil.copy(
        root / "imagesTr" / "liver_001_0000.nii.gz", root / "imagesTr" / "liver_001_0001.nii.gz"
    )


def _region_labels(root: Path) -> None:
    _dataset_json(root, labels={"background": 0, "liver": [1, 2], "cancer": 2})


def _png(root: Path) -> None:
    _dataset_json(root, file_ending=".png")


def _missing_label(root: Path) -> None:
    (root / "labelsTr" / "liver_002.nii.gz").unlink()


def _missing_image(root: Path) -> None:
    (root / "imagesTr" / "liver_002_0000.nii.gz").unlink()


def _ignore_label(root: Path) -> None:
    _dataset_json(root, labels={"background": 0, "liver": 1, "cancer": 2, "ignore": 3})


def _dataset_json(root: Path, **changes: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(meta | changes))


NNUNET_ERRORS: list[tuple[Callable[[Path], None], tuple[str, ...]]] = [
    (_numtraining, ("dataset.json", "'numTraining' = 5", "3 training case(s)")),
    (_two_channels, ("dataset.json", "'channel_names'", "2 channels")),
    (_second_channel_file, ("imagesTr/liver_001_0001.nii.gz", "channel 1")),
    (_region_labels, ("dataset.json", "'labels' entry 'liver'", "region")),
    (_png, ("dataset.json", "'file_ending' = '.png'")),
    (_missing_label, ("labelsTr/liver_002.nii.gz", "does not exist")),
    (_missing_image, ("labelsTr/liver_002.nii.gz", "without its image")),
    (_ignore_label, ("dataset.json", "'ignore'")),
]


def _check_refused(src: Path, out: Path, fragments: tuple[str, ...]) -> None:
    with pytest.raises(DataError) as info:
        prepare_cache(src, out / "cache", DataConfig(resolution=16, sites=1), seed=0)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not (out / "cache").exists()
    result = runner.invoke(
        app, ["data", "prepare", str(src), "--out", str(out / "cli"), "--sites", "1"]
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert fragments[0] in text
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("mutate", "fragments"), DICOM_ERRORS, ids=lambda v: getattr(v, "__name__", "")
)
def test_bad_dicom_input_is_refused_naming_the_file(
    tiny_task: Path, tmp_path: Path, mutate: Callable[[Path], None], fragments: tuple[str, ...]
) -> None:
    root = to_dicom(tiny_task, tmp_path / "dicom")
    read_source(root)  # the pristine folder reads
    mutate(root)
    _check_refused(root, tmp_path, fragments)


@pytest.mark.parametrize(
    ("mutate", "fragments"), NNUNET_ERRORS, ids=lambda v: getattr(v, "__name__", "")
)
def test_bad_nnunet_input_is_refused_naming_the_file(
    tiny_task: Path, tmp_path: Path, mutate: Callable[[Path], None], fragments: tuple[str, ...]
) -> None:
    root = to_nnunet(tiny_task, tmp_path / "Dataset002_Tiny")
    read_source(root)
    mutate(root)
    _check_refused(root, tmp_path, fragments)


def test_unknown_folder_names_the_formats(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="dataset.json.*series.csv"):
        read_source(tmp_path / "data")
