"""Issue 24, finding 4: every bad input or exhausted resource is a message naming its cause.

Each test reproduces one finding: a traceback (bad DICOM numbers, a full disk) or a silent or
misleading result (Inf voxels, an absurd rescale, case ``..``, a huge volume, MemoryError).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from typer.testing import CliRunner

import privseg
from privseg.cli.app import app
from privseg.config import DataConfig
from privseg.core.errors import DataError
from privseg.data import nifti
from privseg.data.prepare import prepare_cache
from task_formats import to_dicom

CFG = DataConfig(resolution=16, sites=1)
SRC = str(Path(privseg.__file__).resolve().parents[1])  # the code under test


@pytest.fixture(scope="module")
def dicom_task(tiny_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_dicom(tiny_task, tmp_path_factory.mktemp("dicom") / "dicom")


def _cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def _first_image(task: Path) -> Path:
    return task / json.loads((task / "dataset.json").read_text())["training"][0]["image"]


def _raw_tag(path: Path, keyword: str, value: bytes) -> None:
    """Store ``value`` as the tag's raw bytes: pydicom refuses to set a malformed DS itself."""
    ds = pydicom.dcmread(path)
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, "DS", len(value), value, 0, False, True)
    ds.save_as(path)


def _single_slice_task(dicom_task: Path, out: Path) -> tuple[Path, Path]:
    """A copy of the DICOM task whose first case is one slice (its step comes from the tags)."""
    root = Path(shutil.copytree(dicom_task, out))
    series = root / "liver_000"
    files = sorted(series.iterdir())
    for extra in files[1:]:
        extra.unlink()
    label = root / "labels" / "liver_000.nii.gz"
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :1], img.affine), label)
    return root, files[0]


@pytest.mark.parametrize("tag", ["SliceThickness", "SpacingBetweenSlices"])
def test_a_non_numeric_dicom_tag_is_named(dicom_task: Path, tmp_path: Path, tag: str) -> None:
    root, file = _single_slice_task(dicom_task, tmp_path / "d")
    _raw_tag(file, tag, b"abc ")
    result = _cli("data", "prepare", root, "--out", tmp_path / "c", "--sites", "1")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert file.name in text and tag in text and "Traceback" not in text
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("tag", "value"), [("RescaleSlope", b"1e38"), ("RescaleIntercept", b"abc ")]
)
def test_an_absurd_rescale_is_refused(
    dicom_task: Path, tmp_path: Path, tag: str, value: bytes
) -> None:
    root = Path(shutil.copytree(dicom_task, tmp_path / "d"))
    file = sorted((root / "liver_001").iterdir())[0]
    _raw_tag(file, tag, value)
    with pytest.raises(DataError, match=rf"{file.name}: .*{tag}"):
        prepare_cache(root, tmp_path / "c", CFG, seed=0)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        ("ImagePositionPatient", b"1e308\\0\\0 "),
        ("PixelSpacing", b"1e300\\1 "),
    ],
)
def test_absurd_geometry_is_named_not_misread(
    dicom_task: Path, tmp_path: Path, tag: str, value: bytes
) -> None:
    """Review of #24: an IPP of 1e308 was reported as a duplicate slice (the projection
    overflowed), a PixelSpacing of 1e300 as something else; both name the tag now."""
    root = Path(shutil.copytree(dicom_task, tmp_path / "d"))
    file = sorted((root / "liver_001").iterdir())[1]
    _raw_tag(file, tag, value)
    with pytest.raises(DataError, match=rf"{file.name}: {tag} .* the geometry tags are wrong"):
        prepare_cache(root, tmp_path / "c", CFG, seed=0)
    assert not (tmp_path / "c").exists()


def test_an_absurd_slice_thickness_is_named(dicom_task: Path, tmp_path: Path) -> None:
    root, file = _single_slice_task(dicom_task, tmp_path / "d")
    _raw_tag(file, "SliceThickness", b"1e300 ")
    with pytest.raises(DataError, match=rf"{file.name}: .*SliceThickness 1e\+300 exceeds"):
        prepare_cache(root, tmp_path / "c", CFG, seed=0)


def test_infinite_voxels_are_refused_even_with_nan_hu(task: Path, tmp_path: Path) -> None:
    image = _first_image(task)
    img = nib.load(image)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[2, 3, 1] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), image)
    for cfg in (CFG, replace(CFG, nan_hu=-1024.0)):
        with pytest.raises(DataError, match=rf"{image.name}: 1 image voxel\(s\) are infinite"):
            prepare_cache(task, tmp_path / "c", cfg, seed=0)


def test_an_image_named_dots_is_not_case_dotdot(task: Path, tmp_path: Path) -> None:
    meta = json.loads((task / "dataset.json").read_text())
    image = task / meta["training"][0]["image"]
    image.rename(image.with_name("...nii.gz"))
    meta["training"][0]["image"] = "./imagesTr/...nii.gz"
    (task / "dataset.json").write_text(json.dumps(meta))
    result = _cli("data", "prepare", task, "--out", tmp_path / "c", "--sites", "1")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "...nii.gz" in text and "case id '..'" in text and "site" not in text


def test_a_volume_over_the_voxel_budget_is_refused_before_reading(
    task: Path, dicom_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("voxels were read")

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", never)
    budget = replace(CFG, max_voxels=16 * 16 * 4 - 1)
    with pytest.raises(DataError, match=r"16 x 16 x 4 = 1024 voxels is over .* data\.max_voxels"):
        prepare_cache(task, tmp_path / "c", budget, seed=0)
    with pytest.raises(DataError, match=r"DICOM series .*liver_00.*1024 voxels is over"):
        prepare_cache(dicom_task, tmp_path / "c", budget, seed=0)
    result = _cli("data", "prepare", task, "--out", tmp_path / "c", "--sites", "1",
                  "--set", "data.max_voxels=1000")  # fmt: skip
    assert result.exit_code == 2 and "1024 voxels" in result.output
    assert DataConfig().max_voxels == 2**28  # the documented default (README, config help)


def test_memory_error_is_not_called_corruption(
    task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", no_memory)
    result = _cli("data", "prepare", task, "--out", tmp_path / "c", "--sites", "1")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "not enough memory" in text and "corrupt" not in text
    assert "imagesTr/liver_00" in text
    assert DataConfig().max_voxels == nifti.MAX_VOXELS


# ---- a full disk -------------------------------------------------------------------------------
def test_a_full_disk_during_prepare_is_a_message_and_leaves_nothing(
    task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    result = _cli("data", "prepare", task, "--out", tmp_path / "c", "--sites", "1")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "disk is full" in result.output and "ENOSPC" in result.output
    assert not (tmp_path / "c").exists()


@pytest.mark.slow  # a subprocess that imports torch and trains one step: ~30 s here
def test_a_file_size_limit_during_train_is_a_message_and_leaves_no_run(
    task: Path, tmp_path: Path
) -> None:
    """``ulimit -f`` stands in for a full disk: the checkpoint cannot be written (EFBIG)."""
    cache = prepare_cache(task, tmp_path / "cache", CFG, seed=0)
    run = tmp_path / "run"
    argv = ["privseg", "train", "--data", str(cache.root), "--out", str(run),
            "--set", "model.features=4", "--set", "train.steps=1", "--set", "train.epochs=1",
            "--set", "data.resolution=16"]  # fmt: skip
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))\n"
        f"sys.argv = {argv!r}\n"
        "from privseg.cli.app import main\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    text = " ".join(done.stderr.split())
    assert "file-size limit" in text and "EFBIG" in text and "Traceback" not in text
    assert not run.exists()
