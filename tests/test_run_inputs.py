"""Issue 24, finding 1: a folder's results belong to its inputs (the data's content and the
command's mode); every reuse of a run or study folder is checked against its record."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from privseg.config import Config
from privseg.core.errors import DataError
from privseg.core.run_folder import RunFolder, RunInputs
from privseg.data.cache import SliceCache
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.runs.train import train

TINY = {
    "data.resolution": 32,
    "train.epochs": 1,
    "train.batch_size": 8,
    "model.features": 4,
    "train.threads": 2,
}


def _cfg(**changes) -> Config:
    return Config().replace(**{**TINY, **changes})


def test_a_run_folder_refuses_another_mode(phantom_cache, tmp_path):
    """central, then local into the same folder: results.json said local, the checkpoint was
    still the central model."""
    out = tmp_path / "run"
    train(_cfg(), data=phantom_cache.root, out=out, mode="central")
    checkpoint = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(DataError, match="holds a central run .* this is a local run"):
        train(_cfg(), data=phantom_cache.root, out=out, mode="local")
    assert json.loads((out / "results.json").read_text())["mode"] == "central"
    assert (out / "checkpoint.pt").read_bytes() == checkpoint


def test_a_run_folder_refuses_other_data_but_not_the_same_data_elsewhere(
    phantom_dir, phantom_cache, tmp_path
):
    out = tmp_path / "run"
    train(_cfg(), data=phantom_cache.root, out=out, mode="central")
    moved = shutil.copytree(phantom_cache.root, tmp_path / "copy" / "cache")  # same content
    train(_cfg(), data=moved, out=out, mode="central")  # a re-run of the same data: accepted
    other = prepare_cache(phantom_dir, tmp_path / "other", _cfg().data, seed=1)  # other splits
    assert other.content_fingerprint != phantom_cache.content_fingerprint
    with pytest.raises(DataError, match=f"data {other.root} .* use a new --out"):
        train(_cfg(), data=other.root, out=out, mode="central")


def test_a_study_refuses_another_task(tmp_path):
    """`privseg run --data T`, then `--data T2` into the same folder: the Dice stayed T's."""
    from privseg.runs.study import run_study

    cfg = _cfg(**{"study.settings": ["central"], "data.sites": 2})
    first = synth_task(tmp_path / "T", sites=2, patients_per_site=3, size=32, slices=6, seed=0)
    second = synth_task(tmp_path / "T2", sites=2, patients_per_site=3, size=32, slices=6, seed=5)
    out = tmp_path / "study"
    run_study(cfg, data=first, out=out, preset="quick")
    dice = json.loads((out / "results.json").read_text())["runs"][0]["dice_mean"]
    central = out / "runs" / "central" / "results.json"
    before = central.stat().st_mtime_ns
    run_study(cfg, data=shutil.copytree(first, tmp_path / "copy"), out=out, preset="quick")
    assert central.stat().st_mtime_ns == before  # the same data elsewhere: skipped
    with pytest.raises(DataError, match="holds a study run of data .* this is a study run"):
        run_study(cfg, data=second, out=out, preset="quick")
    assert json.loads((out / "runs" / "central" / "results.json").read_text())["dice_mean"] == dice


def test_a_finished_server_folder_is_reused_only_with_resume(tmp_path, monkeypatch):
    """`privseg server --out R` on a finished federation deleted R/results.json."""
    from privseg.core.output import hold_folder
    from privseg.federated import deployment

    out = tmp_path / "run"
    hold_folder(out, "run")
    (out / "results.json").write_text('{"mode": "federated"}\n')
    (out / "inputs.json").write_text('{"mode": "server", "data": null, "source": ""}\n')

    def no_processes(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(deployment.Processes, "start", no_processes)
    with pytest.raises(DataError, match="finished federation .* --resume"):
        deployment.serve(_cfg(), out=out, port=1, certs=None, insecure=True)
    assert (out / "results.json").is_file()


def test_the_record_is_checked_before_any_reuse(tmp_path):
    run = RunFolder(tmp_path / "run")
    first = RunInputs("federated", "a" * 64, "cache-a")
    run.admit(first)
    run.results.write_text("{}")
    run.admit(first, resume=True)  # a resume keeps the results until it replaces them
    assert run.results.is_file()
    run.admit(RunInputs("federated", "a" * 64, "elsewhere"))  # same content, another path
    assert not run.results.is_file()  # a re-run never leaves the old results beside it
    with pytest.raises(DataError, match="holds a federated run .* this is a server run"):
        run.admit(RunInputs("server", None))
    old = RunFolder(tmp_path / "old")  # a run an older privseg wrote: no record
    old.root.mkdir()
    old.checkpoint.write_bytes(b"model")
    with pytest.raises(DataError, match="without a record"):
        old.admit(first)


def test_the_content_fingerprint_ignores_file_times_and_paths(phantom_cache, tmp_path):
    copy = shutil.copytree(phantom_cache.root, tmp_path / "cache")
    assert SliceCache.open(copy).content_fingerprint == phantom_cache.content_fingerprint
    site = phantom_cache.sites[0]
    images = copy / site / "train" / "images.npy"
    data = np.load(images)
    np.save(images, data)  # rewritten, same content
    assert SliceCache.open(copy).content_fingerprint == phantom_cache.content_fingerprint


def test_a_cache_changed_after_prepare_is_refused_not_fingerprinted(phantom_cache, tmp_path):
    """The fingerprint trusted the manifest's per-split digests: arrays altered after prepare
    kept the cache's fingerprint, so a study skipped runs made on other data."""
    copy = shutil.copytree(phantom_cache.root, tmp_path / "cache")
    site = phantom_cache.sites[0]
    images = copy / site / "train" / "images.npy"
    data = np.load(images)
    data[0, 0, 0] += 1
    np.save(images, data)
    with pytest.raises(DataError, match=f"{site}/train were changed after prepare"):
        _ = SliceCache.open(copy).content_fingerprint
    shutil.copytree(phantom_cache.root, copy, dirs_exist_ok=True)  # restored
    native = sorted((copy / site / "test" / "native").glob("*.npz"))[0]
    label = np.load(native)["label"]
    np.savez_compressed(native, label=1 - np.clip(label, 0, 1))
    with pytest.raises(DataError, match=f"{site}/test were changed after prepare"):
        _ = SliceCache.open(copy).content_fingerprint
    shutil.copytree(phantom_cache.root, copy, dirs_exist_ok=True)
    manifest = json.loads((copy / "manifest.json").read_text())  # a digest removed by hand
    del manifest["sites"][site]["val"]["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{site}/val were changed after prepare"):
        _ = SliceCache.open(copy).content_fingerprint


def test_a_refused_run_leaves_the_folder_cache_as_it_was(tmp_path):
    """`train --data T2 --out R` on R made from T rebuilt R/cache from T2 before refusing."""
    cfg = _cfg(**{"data.sites": 2})
    first = synth_task(tmp_path / "T", sites=2, patients_per_site=3, size=32, slices=6, seed=0)
    second = synth_task(tmp_path / "T2", sites=2, patients_per_site=3, size=32, slices=6, seed=5)
    out = tmp_path / "run"
    train(cfg, data=first, out=out, mode="central")
    manifest = (out / "cache" / "manifest.json").read_bytes()
    arrays = {p: p.read_bytes() for p in (out / "cache").rglob("*.npy")}
    with pytest.raises(DataError, match="holds a central run .* use a new --out"):
        train(cfg, data=second, out=out, mode="central")
    assert (out / "cache" / "manifest.json").read_bytes() == manifest
    assert {p: p.read_bytes() for p in (out / "cache").rglob("*.npy")} == arrays
    assert not [p for p in (out / "cache").iterdir() if p.name.startswith(".") and p.is_dir()]


def test_an_interrupted_federated_setting_of_a_study_is_resumed(tmp_path, monkeypatch):
    """Review of #23: a study stopped during a federated setting (its rounds saved, no
    results) was refused on the rerun ("pass --resume"), which `privseg run` has no way to
    give; it now finishes the setting from its saved rounds, under the same run id."""
    import functools

    import privseg.runs.study as study
    from privseg.runs.train import train as real_train

    monkeypatch.setattr(study, "train", functools.partial(real_train, simulation="in-process"))
    cfg = _cfg(**{"study.settings": ["federated"], "data.sites": 2, "federated.rounds": 2})
    task = synth_task(tmp_path / "T", sites=2, patients_per_site=3, size=32, slices=6, seed=0)
    out = tmp_path / "study"
    study.run_study(cfg, data=task, out=out, preset="quick")
    setting = RunFolder(out).setting("federated")
    first = json.loads(setting.results.read_text())
    setting.results.unlink()  # as a stop after the last saved round leaves it
    study.run_study(cfg, data=task, out=out, preset="quick")
    again = json.loads(setting.results.read_text())
    assert again["run_id"] == first["run_id"]
    assert [h["round"] for h in again["history"]] == [1, 2]


def test_an_abandoned_run_never_takes_a_ledger_store_with_it(tmp_path):
    """What patients spent is never lost: a failed run's folder holding a privacy ledger
    store (privacy.ledger_dir inside it) is kept, whoever calls abandon."""
    from privseg.core.run_folder import LEDGER_FILE

    kept = RunFolder(tmp_path / "kept").claim("run")
    store = kept.root / "ledger" / LEDGER_FILE
    store.parent.mkdir(parents=True)
    store.write_bytes(b"rows")
    assert not kept.abandon() and store.read_bytes() == b"rows"
    gone = RunFolder(tmp_path / "gone").claim("run")
    (gone.root / "run.log").write_text("failed")
    assert gone.abandon() and not gone.root.exists()
