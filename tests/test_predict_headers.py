"""Issue 27: masks viewers trust. A mask's header is fresh (no display range or description
copied from the CT, units mm) and places the mask exactly where ITK-based viewers (3D Slicer,
ITK-SNAP) place its CT, also when the CT's qform and sform disagree."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.config import Config
from privseg.data.msd import read_task
from privseg.models import build_model
from privseg.models.checkpoint import save_checkpoint


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    cfg = Config().with_overrides(["data.resolution=32", "model.features=4"])
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg.model, cfg.data.n_classes).state_dict(), cfg)
    return path


def _ct(phantom_dir: Path, out: Path, *, shift_qform_mm: float) -> Path:
    """A phantom CT whose header says what scanners' exports say: a display range, a
    description, and (optionally) a qform 2 mm off its sform."""
    img = nib.load(read_task(phantom_dir).cases[0].image)
    ct = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine)
    qform = img.affine.copy()
    qform[0, 3] += shift_qform_mm
    ct.set_qform(qform, code=1)
    ct.set_sform(img.affine, code=2)
    ct.header["cal_min"], ct.header["cal_max"] = -1024, 3071
    ct.header["descrip"] = b"Siemens export"
    nib.save(ct, out)
    return out


def _itk_places(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetOrigin(), image.GetDirection(), image.GetSpacing()


@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_a_mask_has_a_fresh_header_and_lies_where_itk_puts_its_ct(
    checkpoint: Path, phantom_dir: Path, tmp_path: Path, shift: float
) -> None:
    ct = _ct(phantom_dir, tmp_path / "ct.nii.gz", shift_qform_mm=shift)
    out = tmp_path / "mask.nii.gz"
    args = ["predict", "--checkpoint", checkpoint, "--image", ct, "--out", out]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--probabilities"]])
    assert result.exit_code == 0, result.output
    source = nib.load(ct).header
    for written in (out, tmp_path / "mask_prob.nii.gz"):
        header = nib.load(written).header
        assert float(header["cal_min"]) == 0.0 and float(header["cal_max"]) == 0.0
        assert header.get_xyzt_units()[0] == "mm"
        assert b"Siemens" not in header["descrip"].tobytes()
        for get in ("get_qform", "get_sform"):
            (mine, code), (theirs, their_code) = (
                getattr(h, get)(coded=True) for h in (header, source)
            )
            assert code == their_code and np.allclose(mine, theirs, atol=1e-4)
    mask_place, ct_place = _itk_places(out), _itk_places(ct)
    for mine, theirs in zip(mask_place, ct_place, strict=True):
        assert np.allclose(mine, theirs, atol=1e-4)
    assert nib.load(out).shape == nib.load(ct).shape
