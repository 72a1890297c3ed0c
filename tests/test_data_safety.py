"""Issue 15, data side: nothing lost, nothing poisoned. Each test reproduces one finding."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.config import Config, DataConfig
from privseg.core.errors import ConfigError, DataError
from privseg.core.output import LOCK, MARKER, claimed_folder
from privseg.core.run_folder import RunFolder
from privseg.data.cache import SliceCache
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.inference import segment_nifti
from privseg.models import build_model
from privseg.models.checkpoint import save_checkpoint

CFG = DataConfig(resolution=16, sites=1)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = Config().replace(**{"data.resolution": 16, "model.features": 4})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg.model).state_dict(), cfg)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _first_image(task: Path) -> tuple[Path, Path]:
    entry = json.loads((task / "dataset.json").read_text())["training"][0]
    return task / entry["image"], task / entry["label"]


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(path)
    data = np.asarray(img.dataobj) if data is None else data
    out = nib.Nifti1Image(data, img.affine if affine is None else affine)
    nib.save(out, path)


def _patch_header(path: Path, **fields: object) -> None:
    """Change header fields in place, bypassing nibabel's checks (it refuses to write these)."""
    raw = path.read_bytes()
    gz = path.name.endswith(".gz")
    raw = gzip.decompress(raw) if gz else raw
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw))
    for key, value in fields.items():
        header[key] = value
    raw = header.binaryblock + raw[len(header.binaryblock) :]
    path.write_bytes(gzip.compress(raw) if gz else raw)


# ---- never destroy what privseg did not write ------------------------------------------------
def test_synth_refuses_a_real_msd_task_folder(tmp_path: Path) -> None:
    real = tmp_path / "Task03_Liver"
    (real / "imagesTr").mkdir(parents=True)
    (real / "dataset.json").write_text('{"name": "Liver", "training": []}')
    (real / "imagesTr" / "liver_0.nii.gz").write_bytes(b"a real CT")
    (real / "notes.txt").write_text("do not lose me")
    before = _tree(real)
    with pytest.raises(DataError, match="privseg did not create it"):
        synth_task(real, sites=1, patients_per_site=2, size=16, slices=4)
    with pytest.raises(DataError, match="dataset.json, imagesTr"):  # even with overwrite
        synth_task(real, sites=1, patients_per_site=2, size=16, slices=4, overwrite=True)
    result = _cli("data", "synth", real, "--sites", "1", "--patients", "2", "--size", "16")
    assert result.exit_code == 2 and "privseg did not create it" in result.output
    assert _tree(real) == before and not list(real.glob(".privseg*.partial*"))


def test_prepare_refuses_a_foreign_manifest_json(task: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "manifest.json").write_text('{"shipment": 42}')
    (out / "paper.tex").write_text("precious")
    before = _tree(out)
    with pytest.raises(DataError, match="privseg did not create it"):
        prepare_cache(task, out, CFG, seed=0)
    with pytest.raises(DataError, match="would replace manifest.json"):
        prepare_cache(task, out, CFG, seed=0, overwrite=True)
    result = _cli("data", "prepare", task, "--out", out, "--sites", "1")
    assert result.exit_code == 2 and "privseg did not create it" in result.output
    assert {k: v for k, v in _tree(out).items() if not k.startswith(".privseg")} == before


def test_overwrite_adds_next_to_foreign_files_and_rebuild_keeps_them(
    task: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    cache = prepare_cache(task, out, CFG, seed=0, overwrite=True)
    assert cache.sites == ["site-0"]
    rebuilt = prepare_cache(task, out, replace(CFG, slice_policy="all"), seed=0)
    assert not rebuilt.reused and (out / "README.txt").read_text() == "mine"
    owns = json.loads((out / MARKER).read_text())["owns"]
    assert sorted(owns) == ["manifest.json", "site-0"]


def test_outputs_never_replace_inputs(task: Path, tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(DataError, match="would replace the input"):
        prepare_cache(task, task, CFG, seed=0)
    with pytest.raises(DataError, match="would replace the input"):
        prepare_cache(task, tmp_path, CFG, seed=0, overwrite=True)  # contains the task
    image, _ = _first_image(task)
    before = image.read_bytes()
    for out in (image, task / "imagesTr" / ".." / "imagesTr" / image.name):
        with pytest.raises(DataError, match="would replace the input"):
            segment_nifti(checkpoint, image, out, overwrite=True)
    link = tmp_path / "link.nii.gz"
    os.link(image, link)
    with pytest.raises(DataError, match="would replace the input"):
        segment_nifti(checkpoint, image, link, overwrite=True)
    result = _cli("predict", "--checkpoint", checkpoint, "--image", image, "--out", image)
    assert result.exit_code == 2 and "would replace the input" in result.output
    assert image.read_bytes() == before


def test_a_second_writer_is_refused(task: Path, tmp_path: Path) -> None:
    """Two prepares into one --out both printed "built" and one result was silently lost."""
    out = tmp_path / "cache"
    holder = subprocess.Popen(  # another prepare, still running
        [sys.executable, "-c", "import sys, time; from privseg.core.output import claim_folder; "
         "claim_folder(sys.argv[1], 'cache'); print('held', flush=True); time.sleep(60)", out],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = _cli("data", "prepare", task, "--out", out, "--sites", "1")
        assert result.exit_code == 2 and "another privseg process is writing" in result.output
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with claimed_folder(out, "cache"), pytest.raises(DataError, match="another privseg process"):
        prepare_cache(task, out, CFG, seed=0)  # the same lock, within one process
    prepare_cache(task, out, CFG, seed=0)  # a lock goes with its holder


def test_a_killed_prepares_partial_folders_are_removed(task: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare_cache(task, out, CFG, seed=0)
    (out / ".privseg.partial-k1ll3d" / "site-0").mkdir(parents=True)  # SIGKILL mid-build
    (out / ".privseg.partial-k1ll3d" / "site-0" / "images.npy").write_bytes(b"x" * 1000)
    (out / ".privseg.old-k1ll3d").mkdir()
    assert prepare_cache(task, out, CFG, seed=0).reused
    assert sorted(p.name for p in out.iterdir()) == [MARKER, LOCK, "manifest.json", "site-0"]


def test_failed_prepare_into_a_new_folder_leaves_nothing(task: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "cache"
    with pytest.raises(ConfigError):
        prepare_cache(task, out, replace(CFG, labels=[9]), seed=0)
    image, _ = _first_image(task)
    data = np.asarray(nib.load(image).dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    _rewrite(image, data)
    with pytest.raises(DataError, match="NaN"):
        prepare_cache(task, out, CFG, seed=0)
    assert not out.exists()


def test_predict_leftovers_are_cleaned_and_foreign_files_kept(
    task: Path, tmp_path: Path, checkpoint: Path
) -> None:
    image, _ = _first_image(task)
    out = tmp_path / "mask.nii.gz"
    (tmp_path / ".mask.nii.gz.partial.nii.gz").write_bytes(b"half")  # an older predict's
    (tmp_path / ".mask.nii.gz.abcd_123.tmp").write_bytes(b"half")  # atomic_write_bytes'
    (tmp_path / ".mask.nii.gz.notes").write_text("someone else's")
    segment_nifti(checkpoint, image, out)
    assert not (tmp_path / ".mask.nii.gz.partial.nii.gz").exists()
    assert not (tmp_path / ".mask.nii.gz.abcd_123.tmp").exists()
    assert (tmp_path / ".mask.nii.gz.notes").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        segment_nifti(checkpoint, image, out)
    segment_nifti(checkpoint, image, out, overwrite=True)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("missing/mask.nii.gz", "does not exist; create it first"),
        ("adir", "must end with"),
        ("adir.nii", "is a folder"),
        ("mask.png", "must end with .nii.gz or .nii"),
    ],
)
def test_predict_out_must_be_a_nifti_file_in_an_existing_folder(
    task: Path, tmp_path: Path, checkpoint: Path, name: str, match: str
) -> None:
    image, _ = _first_image(task)
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.nii").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _cli("predict", "--checkpoint", checkpoint, "--image", image, "--out", tmp_path / name)
    assert result.exit_code == 2 and match in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not list((tmp_path / "adir").iterdir())


def test_run_folders_are_claimed(tmp_path: Path, phantom_cache: SliceCache) -> None:
    from privseg.runs.train import train

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    with pytest.raises(DataError, match="privseg did not create it"):
        RunFolder(foreign).claim("run")
    with pytest.raises(DataError, match="privseg did not create it"):
        train(Config(), data=Path(phantom_cache.root), out=foreign, mode="central")
    with pytest.raises(DataError, match="not a run folder"):
        RunFolder(phantom_cache.root).claim("run")
    with pytest.raises(DataError, match="would replace the input"):
        train(Config(), data=Path(phantom_cache.root), out=phantom_cache.root, mode="central")
    run = RunFolder(tmp_path / "run").claim("run")
    assert RunFolder(tmp_path / "run").claim("run") == run  # re-entering our own run (resume)
    assert (run.root / MARKER).is_file() and stat.S_IMODE(run.root.stat().st_mode) == 0o700
    assert sorted(os.listdir(foreign)) == ["chapter1.tex"]


# ---- names and paths ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", ".", "..", "a/b", "", "x y", 5])
def test_site_names_from_a_json_site_map_are_validated(
    task: Path, tmp_path: Path, name: object
) -> None:
    site_map = json.loads((task / "sites.json").read_text())
    site_map[next(iter(site_map))] = name
    (task / "sites.json").write_text(json.dumps(site_map))
    with pytest.raises(DataError, match=r"sites\.json") as err:
        prepare_cache(task, tmp_path / "out" / "cache", CFG, seed=0)
    if isinstance(name, str) and name:
        assert repr(name) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]


def test_site_names_from_a_csv_site_map_are_validated(task: Path, tmp_path: Path) -> None:
    ids = list(json.loads((task / "sites.json").read_text()))
    csv_map = tmp_path / "map.csv"
    csv_map.write_text("case_id,site\n" + "".join(f"{c},../evil\n" for c in ids))
    cfg = replace(CFG, site_map=str(csv_map), partition="mapping")
    with pytest.raises(DataError, match=r"map\.csv line 2: site name '\.\./evil'"):
        prepare_cache(task, tmp_path / "cache", cfg, seed=0)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cache").exists()


def test_a_tampered_manifest_site_is_refused(task: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare_cache(task, out, CFG, seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sites"]["../../etc"] = manifest["sites"].pop("site-0")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: site name '\.\./\.\./etc'"):
        SliceCache.open(out)


def test_cache_and_task_files_are_private(task: Path, tmp_path: Path) -> None:
    cache = prepare_cache(task, tmp_path / "cache", CFG, seed=0)
    for root in (cache.root, task):
        for path in [root, *root.rglob("*")]:
            if path.name in (".privseg.lock",):
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o700 if path.is_dir() else 0o600), path


def test_a_hospital_names_its_own_site(task: Path, tmp_path: Path) -> None:
    (task / "sites.json").unlink()  # a hospital's own data has no site map
    cfg = replace(CFG, site_name="hospital-a")
    assert prepare_cache(task, tmp_path / "c1", cfg, seed=0).sites == ["hospital-a"]
    result = _cli("data", "prepare", task, "--out", tmp_path / "c2", "--sites", "1",
                  "--site-name", "site-1", "--set", "data.resolution=16")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert SliceCache.open(tmp_path / "c2").sites == ["site-1"]
    result = _cli("data", "prepare", task, "--out", tmp_path / "c3", "--site-name", "site-1")
    assert result.exit_code == 2 and "data.site_name" in result.output
    with pytest.raises(ConfigError, match="data.site_name"):
        replace(CFG, site_name="../x").check()


# ---- silent poisoning -----------------------------------------------------------------------
def test_nan_voxels_are_an_error_unless_a_value_is_configured(
    task: Path, tmp_path: Path, checkpoint: Path
) -> None:
    image, _ = _first_image(task)
    data = np.asarray(nib.load(image).dataobj).astype(np.float32)
    data[3, 4, 1] = np.nan
    _rewrite(image, data)
    with pytest.raises(DataError, match=rf"{image.name}: 1 image voxel\(s\) are NaN"):
        prepare_cache(task, tmp_path / "cache", CFG, seed=0)
    cache = prepare_cache(task, tmp_path / "cache", replace(CFG, nan_hu=-1024.0), seed=0)
    for site in cache.sites:
        for split in ("train", "val", "test"):
            assert np.isfinite(np.asarray(cache.split(site, split).images)).all()
    with pytest.raises(DataError, match="NaN"):
        segment_nifti(checkpoint, image, tmp_path / "m.nii.gz")


def test_an_undeclared_label_value_is_an_error(task: Path, tmp_path: Path) -> None:
    _, label = _first_image(task)
    data = np.asarray(nib.load(label).dataobj).copy()
    data[0, 0, 0] = 7
    _rewrite(label, data)
    with pytest.raises(
        DataError, match=rf"{label.name}: label value\(s\) \[7\] are not among the task's"
    ):
        prepare_cache(task, tmp_path / "cache", CFG, seed=0)


# ---- tracebacks become messages -----------------------------------------------------------------
@pytest.mark.parametrize("bad", ["zero", "nan", "singular"])
def test_an_unusable_affine_is_named(
    task: Path, tmp_path: Path, checkpoint: Path, bad: str
) -> None:
    image, label = _first_image(task)
    fields: dict[str, object] = {"sform_code": 1, "qform_code": 1}
    if bad == "zero":
        fields |= {"srow_z": [0.0, 0.0, 0.0, 0.0], "pixdim": [1, 1, 1, 0, 1, 1, 1, 1]}
    elif bad == "nan":
        fields |= {"srow_x": [1.0, 0.0, 0.0, np.nan]}
    else:
        fields |= {"srow_y": [1.0, 0.0, 0.0, 0.0], "srow_x": [1.0, 0.0, 0.0, 0.0]}
    for path in (image, label):
        _patch_header(path, **fields)
    result = _cli("data", "prepare", task, "--out", tmp_path / "c", "--sites", "1")
    assert result.exit_code == 2 and "affine" in result.output and image.name in result.output
    assert not (tmp_path / "c").exists()
    result = _cli("predict", "--checkpoint", checkpoint, "--image", image, "--out",
                  tmp_path / "m.nii.gz")  # fmt: skip
    assert result.exit_code == 2 and "affine" in result.output
    assert not (tmp_path / "m.nii.gz").exists()


def test_labels_with_no_foreground_are_named(task: Path, tmp_path: Path) -> None:
    result = _cli("data", "prepare", task, "--out", tmp_path / "c", "--sites", "1",
                  "--set", "data.labels=[9]")  # fmt: skip
    assert result.exit_code == 2 and "data.labels = [9]" in result.output
    for entry in json.loads((task / "dataset.json").read_text())["training"]:
        path = task / entry["label"]
        _rewrite(path, np.zeros(nib.load(path).shape, np.uint8))
    with pytest.raises(DataError, match="no slice with foreground"):
        prepare_cache(task, tmp_path / "c", CFG, seed=0)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("where", ["absolute", "outside"])
def test_dataset_json_paths_must_stay_in_the_task(task: Path, tmp_path: Path, where: str) -> None:
    meta = json.loads((task / "dataset.json").read_text())
    image = task / meta["training"][0]["image"]
    outside = tmp_path / "elsewhere.nii.gz"
    shutil.copy(image, outside)
    meta["training"][0]["image"] = str(outside) if where == "absolute" else "../elsewhere.nii.gz"
    (task / "dataset.json").write_text(json.dumps(meta))
    result = _cli("data", "prepare", task, "--out", tmp_path / "c", "--sites", "1")
    assert result.exit_code == 2
    assert "training[0].image" in result.output and "relative path inside" in result.output


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_header_larger_than_its_file_is_refused_before_reading(
    task: Path, tmp_path: Path, suffix: str
) -> None:
    image, _ = _first_image(task)
    header = nib.load(image).header.copy()
    header.set_data_shape((30000, 30000, 30000))
    raw = header.binaryblock + b"\0" * 4 + b"\1" * 4096
    huge = image.with_name(image.name.replace(".nii.gz", suffix))  # same case id
    huge.write_bytes(gzip.compress(raw) if suffix.endswith("gz") else raw)
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"][0]["image"] = f"./imagesTr/{huge.name}"
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"{huge.name}: header shape .* over the limit"):
        prepare_cache(task, tmp_path / "c", CFG, seed=0)
    header.set_data_shape((1000, 1000, 200))  # under the voxel limit, over the file size
    raw = header.binaryblock + b"\0" * 4 + b"\1" * 4096
    huge.write_bytes(gzip.compress(raw) if suffix.endswith("gz") else raw)
    with pytest.raises(DataError, match="needs .* bytes but the file"):
        prepare_cache(task, tmp_path / "c", CFG, seed=0)
