"""MSD reader: real and phantom volumes load correctly; every bad input names its file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.apps.datasets import load_decathlon_datalist, load_decathlon_properties

from privseg.core.errors import DataError
from privseg.data.msd import load_case, read_task, write_dataset_json
from privseg.data.nifti import load_image


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Mean voxel index per axis, from the per-axis profiles (cheap on 512^2 volumes)."""
    out = []
    for axis in range(mask.ndim):
        profile = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
        out.append((profile * np.arange(len(profile))).sum() / profile.sum())
    return np.array(out)


def test_phantom_task_reads_as_canonical_hu(phantom_dir: Path) -> None:
    task = read_task(phantom_dir)
    assert task.labels == {0: "background", 1: "liver", 2: "cancer"}
    assert len(task.cases) == 12
    for case in task.cases[::4]:
        vol = load_case(case)
        assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
        assert vol.image.shape == vol.label.shape == (64, 64, 16)
        assert -1100 < vol.image.min() < -900 and 500 < vol.image.max() < 3072  # air, bone
        assert set(np.unique(vol.label)) <= {0, 1, 2} and (vol.label == 1).any()
        assert np.all(np.diag(vol.affine)[:3] > 0)  # canonical RAS
        assert np.allclose(np.diag(vol.affine)[:3], vol.spacing)


def test_orientation_liver_on_patient_right_for_flipped_sites(phantom_dir: Path) -> None:
    """Site 1 stores x/y reversed (LPS-like); after reading, the liver is at +x for every site."""
    task = read_task(phantom_dir)
    stored = {np.sign(nib.load(c.image).affine[0, 0]) for c in task.cases}
    assert stored == {-1.0, 1.0}
    for case in task.cases:
        vol = load_case(case)
        body = vol.image > -500
        assert _centroid(vol.label > 0)[0] > _centroid(body)[0] + 3


def test_real_ct_reads_with_plausible_hu_and_orientation(real_msd_dir: Path) -> None:
    task = read_task(real_msd_dir)
    vol = load_case(task.cases[0])
    assert vol.image.shape == (512, 512, 48)
    assert np.allclose(vol.spacing, (0.5703125, 0.5703125, 5.0))
    assert vol.image.min() >= -1024 and vol.image.max() <= 3071
    assert (vol.image < -500).mean() > 0.5  # air around the chest and in the lungs
    assert 0 < (vol.label == 1).sum() < 5000  # a small tumour
    body = vol.image > -300
    middle = np.zeros(body.shape, bool)
    middle[236:276] = True  # the spine lies on the midline
    assert _centroid((vol.image > 300) & middle)[1] < _centroid(body)[1] - 20  # spine is posterior
    array, img = load_image(task.cases[0].image)  # the inference path sees the same grid
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.array_equal(array, vol.image) and np.allclose(img.affine, vol.affine)


def test_dataset_json_is_monai_decathlon_compatible(phantom_dir: Path) -> None:
    props = load_decathlon_properties(
        phantom_dir / "dataset.json", ["name", "labels", "numTraining"]
    )
    assert props["numTraining"] == 12
    items = load_decathlon_datalist(phantom_dir / "dataset.json", True, "training")
    assert all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)


# ---- bad inputs ---------------------------------------------------------------------------
def _tiny_task(root: Path, image=None, label=None, label_affine=None) -> Path:
    image = np.zeros((8, 8, 4), np.int16) if image is None else image
    label = np.zeros((8, 8, 4), np.uint8) if label is None else label
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / "c1.nii.gz")
    lab_aff = affine if label_affine is None else label_affine
    nib.save(nib.Nifti1Image(label, lab_aff), root / "labelsTr" / "c1.nii.gz")
    write_dataset_json(root, name="Tiny", labels={0: "background", 1: "x"}, case_ids=["c1"])
    return root


def _expect(task_root: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as info:
        for case in read_task(task_root).cases:
            load_case(case)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_dataset_json(tmp_path: Path) -> None:
    (_tiny_task(tmp_path) / "dataset.json").unlink()
    _expect(tmp_path, "dataset.json", "missing")


def test_malformed_dataset_json(tmp_path: Path) -> None:
    (_tiny_task(tmp_path) / "dataset.json").write_text("{not json")
    _expect(tmp_path, "dataset.json", "not valid JSON")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [({"training": None}, "'training'"), ({"training": [{"image": "x"}]}, "training[0]")],
)
def test_dataset_json_without_training_entries(tmp_path: Path, change: dict, fragment: str) -> None:
    meta = json.loads((_tiny_task(tmp_path) / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps(meta | change))
    _expect(tmp_path, "dataset.json", fragment)


def test_image_without_label(tmp_path: Path) -> None:
    (_tiny_task(tmp_path) / "labelsTr" / "c1.nii.gz").unlink()
    _expect(tmp_path, "labelsTr/c1.nii.gz", "does not exist")


def test_label_without_image(tmp_path: Path) -> None:
    (_tiny_task(tmp_path) / "imagesTr" / "c1.nii.gz").unlink()
    _expect(tmp_path, "imagesTr/c1.nii.gz", "does not exist")


def test_shape_mismatch(tmp_path: Path) -> None:
    _tiny_task(tmp_path, label=np.zeros((8, 8, 5), np.uint8))
    _expect(tmp_path, "labelsTr/c1.nii.gz", "(8, 8, 5)", "(8, 8, 4)")


def test_affine_mismatch(tmp_path: Path) -> None:
    _tiny_task(tmp_path, label_affine=np.diag([1.0, 1.0, 2.5, 1.0]))
    _expect(tmp_path, "labelsTr/c1.nii.gz", "affine")


def test_truncated_nifti(tmp_path: Path) -> None:
    path = _tiny_task(tmp_path, image=np.random.default_rng(0).normal(size=(8, 8, 4))) / "imagesTr"
    data = (path / "c1.nii.gz").read_bytes()
    (path / "c1.nii.gz").write_bytes(data[: len(data) // 2])
    _expect(tmp_path, "imagesTr/c1.nii.gz")


def test_non_nifti_file(tmp_path: Path) -> None:
    path = _tiny_task(tmp_path) / "labelsTr" / "c1.nii.gz"
    path.write_bytes(gzip.compress(b"this is a text file, not an image"))
    _expect(tmp_path, "labelsTr/c1.nii.gz", "NIfTI")


def test_non_integer_labels(tmp_path: Path) -> None:
    _tiny_task(tmp_path, label=np.full((8, 8, 4), 0.5, np.float32))
    _expect(tmp_path, "labelsTr/c1.nii.gz", "integers")


def test_missing_task_folder(tmp_path: Path) -> None:
    _expect(tmp_path / "nope", "nope", "does not exist")
