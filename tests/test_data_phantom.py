"""Phantom: deterministic by seed, sites that differ like scanners, not trivially separable."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from privseg.core.errors import ConfigError, DataError
from privseg.data.anatomy import FAT, LIVER, MUSCLE, SPLEEN, _anatomy
from privseg.data.msd import load_case, read_task
from privseg.data.phantom import synth_task
from privseg.data.scanners import scanner


def _volumes(task_dir: Path) -> dict[str, object]:
    return {c.case_id: load_case(c) for c in read_task(task_dir).cases}


def test_same_seed_same_files_other_seed_other_patients(tmp_path: Path) -> None:
    tiny = {"sites": 2, "patients_per_site": 1, "size": 32, "slices": 8}
    first = synth_task(tmp_path / "a", seed=5, **tiny)
    again = synth_task(tmp_path / "b", seed=5, **tiny)
    other = synth_task(tmp_path / "c", seed=6, **tiny)
    for case in ("liver_000", "liver_001"):
        image = nib.load(first / "imagesTr" / f"{case}.nii.gz").get_fdata()
        assert np.array_equal(image, nib.load(again / "imagesTr" / f"{case}.nii.gz").get_fdata())
        assert not np.array_equal(
            image, nib.load(other / "imagesTr" / f"{case}.nii.gz").get_fdata()
        )
    assert (again / "sites.json").read_text() == (first / "sites.json").read_text()


def test_task_folder_layout_and_site_map(phantom_dir: Path) -> None:
    meta = json.loads((phantom_dir / "dataset.json").read_text())
    for key in ("name", "description", "reference", "licence", "tensorImageSize", "modality"):
        assert key in meta
    assert meta["numTraining"] == len(meta["training"]) == 12
    sites = json.loads((phantom_dir / "sites.json").read_text())
    assert sorted(set(sites.values())) == ["site-0", "site-1", "site-2"]
    for case in read_task(phantom_dir).cases:
        image, label = nib.load(case.image), nib.load(case.label)
        assert image.shape == label.shape and np.array_equal(image.affine, label.affine)
        assert image.get_data_dtype() == np.int16


def test_sites_differ_like_scanners(phantom_dir: Path) -> None:
    """Fat HU (calibration), voxel spacing (field of view) and noise differ between sites."""
    volumes = _volumes(phantom_dir)
    fat_hu, spacing = {}, {}
    for case_id, vol in volumes.items():
        site = int(case_id[-3:]) // 4
        fat = (vol.image > -160) & (vol.image < -40)  # subcutaneous and visceral fat
        fat_hu.setdefault(site, []).append(float(np.median(vol.image[fat])))
        spacing.setdefault(site, set()).add(vol.spacing)
    medians = [np.mean(fat_hu[s]) for s in range(3)]
    assert max(medians) - min(medians) > 8, medians
    assert all(len(spacing[s]) == 1 for s in range(3)) and len(set().union(*spacing.values())) == 3
    noise = [scanner(s, 0).noise for s in range(3)]
    assert max(noise) / min(noise) > 1.2


def test_liver_is_not_trivially_separable(phantom_dir: Path) -> None:
    """Liver HU lies within a few noise SDs of muscle and spleen, so thresholding fails."""
    rng = np.random.default_rng(0)
    x = np.linspace(-200, 200, 96, dtype=np.float32)[:, None, None]
    y = np.linspace(-200, 200, 96, dtype=np.float32)[None, :, None]
    z = np.linspace(0, 200, 16, dtype=np.float32)[None, None, :]
    tissue = _anatomy(rng, x, y, z, "liver")
    assert (tissue == LIVER).any() and (tissue == SPLEEN).any() and (tissue == MUSCLE).any()
    for case_id, vol in list(_volumes(phantom_dir).items())[::3]:
        liver = vol.label == 1
        body_soft = (vol.image > 0) & (vol.image < 150) & ~(vol.label > 0)
        gap = abs(np.median(vol.image[liver]) - np.median(vol.image[body_soft]))
        assert gap < 60, (case_id, gap)
        assert 0.03 < liver.mean() < 0.3
    assert FAT < LIVER  # painting order: organs are drawn over the fat


def test_lesions_lie_inside_the_liver(phantom_dir: Path) -> None:
    volumes = _volumes(phantom_dir)
    with_lesion = [v for v in volumes.values() if (v.label == 2).any()]
    assert with_lesion, "some phantom patients should have lesions"
    for vol in with_lesion:
        liver_hu = np.median(vol.image[vol.label == 1])
        assert np.median(vol.image[vol.label == 2]) < liver_hu - 10  # hypodense


def test_pancreas_variant(tmp_path: Path) -> None:
    task = synth_task(
        tmp_path / "p", sites=1, patients_per_site=2, size=48, slices=12, organ="pancreas"
    )
    assert read_task(task).labels[1] == "pancreas"
    vol = load_case(read_task(task).cases[0])
    assert 0 < (vol.label > 0).mean() < 0.02  # a small organ


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="organ"):
        synth_task(tmp_path / "x", organ="brain")
    with pytest.raises(ConfigError, match="patients_per_site"):
        synth_task(tmp_path / "x", patients_per_site=0)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        synth_task(tmp_path, sites=1, patients_per_site=1, size=16, slices=4)
    assert (tmp_path / "notes.txt").exists()
