"""`privseg predict`: a mask in the input's voxel grid, affine and orientation; clear errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.config import Config
from privseg.core.errors import CheckpointError, DataError
from privseg.inference import segment_nifti
from privseg.models import build_model
from privseg.models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Config().replace(**{"data.resolution": 32, "model.features": 8})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg.model).state_dict(), cfg)
    return path


def _volume(tmp_path, shape=(40, 36, 7), affine=None, name="ct.nii.gz"):
    rng = np.random.default_rng(0)
    data = rng.normal(0, 300, size=shape).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path, affine


@pytest.mark.parametrize("flip", [False, True])
def test_round_trip_shape_and_affine(checkpoint, tmp_path, flip):
    affine = np.diag([-0.8 if flip else 0.8, 0.8, 2.5, 1.0])
    image, affine = _volume(tmp_path, affine=affine)
    out = tmp_path / "mask.nii.gz"
    stats = segment_nifti(checkpoint, image, out)
    mask = nib.load(out)
    assert mask.shape == (40, 36, 7)
    np.testing.assert_allclose(mask.affine, affine)
    data = np.asarray(mask.dataobj)
    assert set(np.unique(data)) <= {0, 1}
    assert stats["slices"] == 7 and stats["foreground_voxels"] == int(data.sum())


def test_orientation_is_restored(checkpoint, tmp_path, monkeypatch):
    """A model that marks the left half must mark the same voxels whatever the file's axes."""
    import privseg.models.checkpoint as ckpt

    class LeftHalf(torch.nn.Module):
        def forward(self, x):
            out = torch.full_like(x, -10.0)
            out[..., : x.shape[-2] // 2, :] = 10.0  # first canonical axis (x: towards R)
            return out

    cfg = Config().replace(**{"data.resolution": 32, "model.features": 8})
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda path: (LeftHalf(), cfg, {}))
    masks = []
    for flip in (False, True):
        affine = np.diag([-1.0 if flip else 1.0, 1.0, 1.0, 1.0])
        image, _ = _volume(tmp_path, shape=(32, 32, 3), affine=affine, name=f"f{flip}.nii.gz")
        out = tmp_path / f"m{flip}.nii.gz"
        segment_nifti(checkpoint, image, out)
        world = np.asarray(nib.as_closest_canonical(nib.load(out)).dataobj)
        masks.append(world)
    np.testing.assert_array_equal(masks[0], masks[1])
    assert masks[0][:16].all() and not masks[0][16:].any()


def test_bad_inputs(checkpoint, tmp_path):
    not_nifti = tmp_path / "x.nii.gz"
    not_nifti.write_bytes(b"not a nifti file at all")
    with pytest.raises(DataError, match="x.nii.gz"):
        segment_nifti(checkpoint, not_nifti, tmp_path / "m.nii.gz")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
    with pytest.raises(DataError, match="3D"):
        segment_nifti(checkpoint, flat, tmp_path / "m.nii.gz")
    image, _ = _volume(tmp_path)
    with pytest.raises(CheckpointError, match="missing.pt"):
        segment_nifti(tmp_path / "missing.pt", image, tmp_path / "m.nii.gz")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="other.pt"):
        segment_nifti(other, image, tmp_path / "m.nii.gz")
    assert not (tmp_path / "m.nii.gz").exists()


def test_cli_reports_user_errors_without_traceback(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "--checkpoint",
            str(tmp_path / "none.pt"),
            "--image",
            str(tmp_path / "ct.nii.gz"),
            "--out",
            str(tmp_path / "m.nii.gz"),
        ],
    )
    assert result.exit_code == 2
    assert "none.pt" in result.output and "Traceback" not in result.output
