"""Issue 24, finding 5: `predict` on a folder never overwrites one output with another, runs
every good case when one is bad, says which failed, and `--continue` completes the folder."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

import privseg.models.checkpoint as ckpt
from conftest import Bright
from privseg.cli.app import app
from privseg.config import Config
from privseg.data.msd import read_task
from privseg.models import build_model
from privseg.models.checkpoint import save_checkpoint

runner = CliRunner()


@pytest.fixture
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cfg = Config().with_overrides(["data.resolution=32", "model.features=4"])
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg.model, cfg.data.n_classes).state_dict(), cfg)
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda p: (Bright(), cfg, {}))
    return path


@pytest.fixture
def cts(phantom_dir: Path, tmp_path: Path) -> Path:
    """Three CTs: a, b, c."""
    folder = tmp_path / "cts"
    folder.mkdir()
    for name, case in zip("abc", read_task(phantom_dir).cases, strict=False):
        (folder / f"{name}.nii.gz").write_bytes(case.image.read_bytes())
    return folder


def _predict(checkpoint: Path, cts: Path, out: Path, *extra: str):
    args = ["predict", "--checkpoint", checkpoint, "--image", cts, "--out", out, *extra]
    return runner.invoke(app, [str(a) for a in args])


def test_output_names_that_collide_are_refused_before_any_work(
    checkpoint: Path, cts: Path, tmp_path: Path
) -> None:
    (cts / "a.nii.gz").rename(cts / "a_prob.nii.gz")
    (cts / "b.nii.gz").rename(cts / "a.nii.gz")  # a's probabilities = a_prob's mask
    result = _predict(checkpoint, cts, tmp_path / "out", "--probabilities")
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "a_prob.nii.gz" in text and "case a's probabilities" in text
    assert "case a_prob's mask" in text
    assert not (tmp_path / "out").exists()
    result = _predict(checkpoint, cts, tmp_path / "out")  # without --probabilities: no clash
    assert result.exit_code == 0, result.output


def test_a_bad_case_is_reported_the_others_run_and_continue_completes(
    checkpoint: Path, cts: Path, tmp_path: Path
) -> None:
    good = (cts / "b.nii.gz").read_bytes()
    (cts / "b.nii.gz").write_bytes(good[:200])  # truncated
    out = tmp_path / "out"
    result = _predict(checkpoint, cts, out, "--preview")
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "1 CT(s) failed" in text and "b: " in text and "b.nii.gz" in text
    assert "2 CT(s) segmented" in text
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "a.nii.gz", "a_preview.png", "c.nii.gz", "c_preview.png"
    }  # fmt: skip
    a_before = (out / "a.nii.gz").stat().st_mtime_ns
    again = _predict(checkpoint, cts, out, "--preview")  # no --continue: refused as before
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output
    (cts / "b.nii.gz").write_bytes(good)  # fixed
    done = _predict(checkpoint, cts, out, "--preview", "--continue")
    assert done.exit_code == 0, done.output
    text = " ".join(done.output.split())
    assert "1 CT(s) segmented" in text and "2 finished earlier (skipped)" in text
    assert (out / "b.nii.gz").is_file() and (out / "b_preview.png").is_file()
    assert (out / "a.nii.gz").stat().st_mtime_ns == a_before  # not redone
    other = _predict(checkpoint, cts, out, "--continue")  # other options: not this run's masks
    assert other.exit_code == 2 and "other options" in " ".join(other.output.split())


def test_continue_never_replaces_an_output_changed_since(
    checkpoint: Path, cts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert _predict(checkpoint, cts, out).exit_code == 0
    (out / "c.nii.gz").write_bytes(b"edited by hand")  # no longer privseg's
    result = _predict(checkpoint, cts, out, "--continue")
    assert result.exit_code == 2 and "c.nii.gz exists" in " ".join(result.output.split())
    assert (out / "c.nii.gz").read_bytes() == b"edited by hand"


def test_a_readers_own_error_fails_its_case_not_the_folder(
    checkpoint: Path, cts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of #24: a DICOM series nibabel refuses (HeaderDataError, a ValueError) stopped
    the folder with a traceback after the first case; it fails its own case now."""
    import privseg.inference.folder as folder

    real = folder.read_ct

    def read_ct(path, *args, **kwargs):
        if Path(path).name.startswith("b"):
            raise ValueError("header refused by the reader")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folder, "read_ct", read_ct)
    result = _predict(checkpoint, cts, tmp_path / "out")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "1 CT(s) failed" in text and "2 CT(s) segmented" in text


def test_a_nifti_scaled_beyond_any_hu_is_refused(
    checkpoint: Path, cts: Path, tmp_path: Path
) -> None:
    """Review of #24: a NIfTI scl_slope of 1e30 was accepted (DICOM's was refused)."""
    import gzip
    import struct

    import nibabel as nib
    import numpy as np

    img = nib.load(cts / "a.nii.gz")
    raw = tmp_path / "a.nii"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine), raw)
    data = bytearray(raw.read_bytes())
    data[112:120] = struct.pack("<ff", 1e30, 0.0)  # scl_slope, scl_inter of the NIfTI-1 header
    (cts / "a.nii.gz").write_bytes(gzip.compress(bytes(data)))
    result = _predict(checkpoint, cts, tmp_path / "out")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "beyond +-100000" in text, text


def test_continue_redoes_a_case_whose_ct_was_replaced(
    checkpoint: Path, cts: Path, tmp_path: Path
) -> None:
    """Review of #24: --continue kept a.nii.gz's mask after a.nii.gz was replaced by another
    CT; the record now holds each input's hash."""
    out = tmp_path / "out"
    assert _predict(checkpoint, cts, out).exit_code == 0
    (cts / "a.nii.gz").write_bytes((cts / "b.nii.gz").read_bytes())  # another CT, same name
    again = _predict(checkpoint, cts, out, "--continue")
    text = " ".join(again.output.split())
    assert again.exit_code == 0, again.output
    assert "1 CT(s) segmented" in text and "2 finished earlier (skipped)" in text
    voxels = [np.asarray(nib.load(out / f"{n}.nii.gz").dataobj) for n in "ab"]
    assert np.array_equal(*voxels)  # (not the files' bytes: gzip headers hold a time)


def test_no_output_goes_inside_a_slice_cache(
    checkpoint: Path, cts: Path, phantom_cache, tmp_path: Path
) -> None:
    """Review of #24: a single-file `predict --out` inside a cache was written there (the next
    prepare would discard it, and a cache holds prepared data only); a folder --out too."""
    inside = Path(phantom_cache.root) / phantom_cache.sites[0]
    for image, out in ((cts / "a.nii.gz", inside / "mask.nii.gz"), (cts, inside / "masks")):
        result = _predict(checkpoint, image, out)
        assert result.exit_code == 2, result.output
        assert "privseg rebuilds as a whole" in " ".join(result.output.split())
        assert not out.exists()
    result = _predict(checkpoint, cts / "a.nii.gz", tmp_path / "mask.nii.gz")
    assert result.exit_code == 0, result.output


def test_a_run_folder_is_not_a_prediction_folder(
    checkpoint: Path, cts: Path, tmp_path: Path
) -> None:
    """Review of #24: `predict --out RUN` mixed masks and the prediction record into a run
    folder, beside its results and the sites' kept replies."""
    from privseg.core.run_folder import RunFolder

    run = RunFolder(tmp_path / "run").claim("run")
    result = _predict(checkpoint, cts, run.root)
    assert result.exit_code == 2, result.output
    assert "is a privseg run folder" in " ".join(result.output.split())
    assert not list(run.root.glob("*.nii.gz"))
