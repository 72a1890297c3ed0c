"""Shared fixtures: a small phantom task, its slice cache, and two real CTs as an MSD task."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from privseg.config import DataConfig
from privseg.data.cache import SliceCache, prepare_cache
from privseg.data.msd import write_dataset_json
from privseg.data.phantom import synth_task
from privseg.io import write_json

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("PRIVSEG_TESTDATA", ROOT / ".cache" / "testdata"))
# Two chest CTs from different scanners (pyradiomics 3.0.1 test data, BSD-3).
REAL_CASES = {"lung1": "site-a", "lung2": "site-b"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    """The test machine is shared: at most two torch threads."""
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom MSD task: 3 sites x 4 patients, 64 x 64 x 16 voxels, labels 1 liver / 2 lesion."""
    out = tmp_path_factory.mktemp("phantom") / "Task_Phantom"
    return synth_task(out, sites=3, patients_per_site=4, seed=0, size=64, slices=16)


@pytest.fixture(scope="session")
def phantom_cache(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SliceCache:
    """The phantom prepared at resolution 32 with the default settings (sites from sites.json)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    return prepare_cache(phantom_dir, out, DataConfig(resolution=32), seed=0)


@pytest.fixture(scope="session")
def real_msd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real CTs (NRRD, LPS) converted to an MSD task folder; one site per scanner."""
    nrrd = pytest.importorskip("nrrd")
    src = TESTDATA / "pyradiomics"
    missing = [n for n in REAL_CASES if not (src / f"{n}_label.nrrd").is_file()]
    if missing:
        message = f"real CT test data missing in {src}: run scripts/fetch_test_data.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("real") / "Task_RealCT"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for case in REAL_CASES:
        for kind, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            data, header = nrrd.read(str(src / f"{case}_{kind}.nrrd"), index_order="F")
            dtype = np.int16 if kind == "image" else np.uint8
            img = nib.Nifti1Image(data.astype(dtype), nrrd_affine(header))
            nib.save(img, root / folder / f"{case}.nii.gz")
    write_dataset_json(
        root,
        name="RealCT",
        labels={0: "background", 1: "tumour"},
        case_ids=list(REAL_CASES),
        licence="BSD-3-Clause (pyradiomics)",
    )
    write_json(root / "sites.json", REAL_CASES)
    return root


def nrrd_affine(header: dict) -> np.ndarray:
    """NRRD ``space directions`` (one row per axis) and ``space origin`` -> a RAS NIfTI affine."""
    if header.get("space") not in ("left-posterior-superior", "LPS"):
        raise ValueError(f"unsupported NRRD space {header.get('space')!r}")
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    lps[:3, 3] = header["space origin"]
    return LPS_TO_RAS @ lps
