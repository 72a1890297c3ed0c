"""`privseg predict` on what hospitals hold: DICOM series, folders of CTs, physical spacing,
several classes; with probabilities and a preview a radiologist can look at."""

from __future__ import annotations

import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import privseg.models.checkpoint as ckpt
from conftest import Bright
from privseg.cli.app import app
from privseg.config import Config
from privseg.core.classes import Classes, bits_to_target
from privseg.data.msd import read_task
from privseg.data.nifti import load_image
from privseg.data.preprocess import PlaneTransform, label_to_model_target
from privseg.evaluation.metrics import dice
from privseg.inference import segment_folder, segment_nifti
from privseg.inference.folder import RECORD
from privseg.inference.volume import predict_ct, read_ct
from privseg.models import build_model
from privseg.models.checkpoint import save_checkpoint
from task_formats import write_series

TWO = ["data.classes={liver = [1, 2], tumour = [2]}"]


class Oracle(torch.nn.Module):
    """Returns the label's own model-grid slices, in order: the model replaced by the label."""

    def __init__(self, bits: np.ndarray, channels: int) -> None:
        super().__init__()
        self.logits = bits_to_target(bits, channels) * 40.0 - 20.0
        self.done = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.done : self.done + len(x)]
        self.done += len(x)
        return out


def _checkpoint(tmp_path: Path, overrides: list[str] = ()) -> tuple[Path, Config]:
    cfg = Config().with_overrides(["data.resolution=32", "model.features=8", *overrides])
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg.model, cfg.data.n_classes).state_dict(), cfg)
    return path, cfg


def _stub(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, cfg: Config) -> None:
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda path: (model, cfg, {}))


def _canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


@pytest.mark.parametrize(("factor", "floor"), [(0.5, 0.99), (0.7, 0.99), (1.0, 1.0), (1.3, 0.95)])
def test_spacing_round_trip_with_the_label_as_the_model(
    phantom_dir: Path, factor: float, floor: float
) -> None:
    """Prepare with data.spacing, predict, map back: with the label itself as the model, the mask
    on the original grid matches the label at Dice >= 0.99 per class when the model's pixels
    are as fine as the CT's or finer. Coarser pixels lose detail: at 1.3x the phantom's 6 mm
    pixels liver Dice is 0.97 (what any resampling costs, not a mapping error)."""
    case = read_task(phantom_dir).cases[0]
    hu, img = load_image(case.image)
    label, _ = load_image(case.label)
    zooms = img.header.get_zooms()[:3]
    size = round(hu.shape[0] * zooms[0] / (zooms[0] * factor))
    resolution = -(-size // 8) * 8  # the whole field of view fits: no crop
    cfg = Config().with_overrides(
        [f"data.spacing={zooms[0] * factor}", f"data.resolution={resolution}", *TWO]
    )
    plane = PlaneTransform.of(hu.shape, zooms, cfg.data)
    oracle = Oracle(label_to_model_target(label.astype(np.uint8), cfg.data, plane), 2)
    ct = read_ct(case.image, None)
    mask, _ = predict_ct(oracle, cfg, ct)
    truth = Classes.of(cfg.data).encode(label.astype(np.uint8))
    for k in range(2):
        score = dice((mask >> k) & 1 > 0, (truth >> k) & 1 > 0)
        assert score >= floor, (k, factor, score)


def test_a_dicom_series_gives_the_mask_of_its_nifti(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, cfg = _checkpoint(tmp_path)
    _stub(monkeypatch, Bright(), cfg)
    case = read_task(phantom_dir).cases[1]
    hu, img = load_image(case.image)
    write_series(tmp_path / "series", hu, img.affine, rng=np.random.default_rng(0))
    from_nifti = segment_nifti(checkpoint, case.image, tmp_path / "a.nii.gz")
    from_dicom = segment_nifti(checkpoint, tmp_path / "series", tmp_path / "b.nii.gz")
    a, b = _canonical(tmp_path / "a.nii.gz"), _canonical(tmp_path / "b.nii.gz")
    assert from_nifti["foreground_voxels"] > 100 and np.array_equal(a, b)
    dicom_mask = nib.load(tmp_path / "b.nii.gz")  # on the series' own grid (LPS voxel order)
    assert nib.aff2axcodes(dicom_mask.affine) == ("L", "P", "S")
    assert np.allclose(nib.as_closest_canonical(dicom_mask).affine, img.affine)
    assert from_dicom["foreground_voxels"] == from_nifti["foreground_voxels"]


def test_two_classes_write_the_training_label_values_probabilities_and_a_preview(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, cfg = _checkpoint(tmp_path, TWO)
    _stub(monkeypatch, Bright(2), cfg)
    image = read_task(phantom_dir).cases[0].image
    out = tmp_path / "mask.nii.gz"
    stats = segment_nifti(checkpoint, image, out, probabilities=True, preview=True)
    labels = np.asarray(nib.load(out).dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}  # liver 1, tumour 2, as in the training labels
    assert stats["class_voxels"]["tumour"] == int((labels == 2).sum())
    assert stats["class_voxels"]["liver"] == int((labels > 0).sum())  # tumour is inside liver
    prob = nib.load(tmp_path / "mask_prob.nii.gz")
    p = np.asarray(prob.dataobj, dtype=np.float32)
    assert p.shape == (*labels.shape, 2) and p.min() >= 0.0 and p.max() <= 1.0
    assert np.allclose(prob.affine, nib.load(image).affine)
    assert ((p[..., 1] > 0.5) == (labels == 2)).mean() > 0.999  # the 1/255 steps aside
    png = tmp_path / "mask_preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in (out, png, tmp_path / "mask_prob.nii.gz"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600  # patient data


def test_a_folder_of_cts_and_one_of_series_through_the_cli(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, cfg = _checkpoint(tmp_path)
    _stub(monkeypatch, Bright(), cfg)
    cases = read_task(phantom_dir).cases[:2]
    niftis, series = tmp_path / "niftis", tmp_path / "series"
    niftis.mkdir()
    for case in cases:
        (niftis / case.image.name).write_bytes(case.image.read_bytes())
        hu, img = load_image(case.image)
        write_series(series / case.case_id, hu, img.affine, rng=np.random.default_rng(0))
    runner = CliRunner()
    for folder, out in ((niftis, tmp_path / "out-n"), (series, tmp_path / "out-d")):
        args = ["predict", "--checkpoint", str(checkpoint), "--image", str(folder)]
        result = runner.invoke(app, [*args, "--out", str(out), "--preview"])
        assert result.exit_code == 0, result.output
        names = sorted(p.name for p in out.iterdir() if p.name != RECORD)
        assert names == sorted(
            [f"{c.case_id}.nii.gz" for c in cases] + [f"{c.case_id}_preview.png" for c in cases]
        )
    for case in cases:
        a = _canonical(tmp_path / "out-n" / f"{case.case_id}.nii.gz")
        assert np.array_equal(a, _canonical(tmp_path / "out-d" / f"{case.case_id}.nii.gz"))
    again = runner.invoke(app, [*args, "--out", str(tmp_path / "out-d")])
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output
    inside = runner.invoke(app, [*args, "--out", str(series / "masks")])
    assert inside.exit_code == 2 and "inside the input folder" in inside.output
    assert not (series / "masks").exists()


def test_a_folder_is_checked_before_any_work(tmp_path: Path, monkeypatch) -> None:
    checkpoint, cfg = _checkpoint(tmp_path)
    _stub(monkeypatch, Bright(), cfg)
    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    (mixed / "ct.nii.gz").write_bytes(b"x")
    with pytest.raises(Exception, match=r"CTs of several formats \(msd: ct.nii.gz, dicom: sub\)"):
        segment_folder(checkpoint, mixed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_masks_may_go_into_the_run_folder_of_the_checkpoint(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    checkpoint, cfg = _checkpoint(run)
    _stub(monkeypatch, Bright(), cfg)
    cts = tmp_path / "cts"
    cts.mkdir()
    case = read_task(phantom_dir).cases[0]
    (cts / case.image.name).write_bytes(case.image.read_bytes())
    before = checkpoint.read_bytes()
    results = segment_folder(checkpoint, cts, run)  # the run folder that holds the checkpoint
    assert Path(results.written[0]["files"]["mask"]) == run / f"{case.case_id}.nii.gz"
    assert checkpoint.read_bytes() == before
    with pytest.raises(Exception, match="inside the input folder"):
        segment_folder(checkpoint, cts, cts / "masks")


def test_a_refused_folder_run_leaves_no_output_folder(phantom_dir: Path, tmp_path: Path) -> None:
    cts = tmp_path / "cts"
    cts.mkdir()
    case = read_task(phantom_dir).cases[0]
    (cts / case.image.name).write_bytes(case.image.read_bytes())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.pt"):
        segment_folder(bad, cts, tmp_path / "masks")
    assert not (tmp_path / "masks").exists()
