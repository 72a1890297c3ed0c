"""Slice cache: contents, reuse, rebuild on changed settings, atomicity."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import privseg.data.cache as cache_module
import privseg.data.prepare as prepare_module
from privseg.config import DataConfig
from privseg.core.errors import DataError
from privseg.data.cache import SliceCache, SliceSplit
from privseg.data.msd import load_case, read_task
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.data.preprocess import image_to_model_input

SMALL = DataConfig(resolution=16)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.npy")}


def test_split_arrays_match_the_contract(phantom_cache: SliceCache) -> None:
    split = phantom_cache.split("site-0", "train")
    assert isinstance(split.images, np.memmap) and split.images.dtype == np.float16
    assert split.images.shape[1:] == (32, 32) and split.labels.dtype == np.uint8
    assert split.images.min() >= 0.0 and split.images.max() <= 1.0
    assert set(np.unique(split.labels)) == {0, 1}
    assert len(split) == len(split.labels) == len(split.patient) == len(split.z)
    assert split.patient.max() == len(split.patient_ids) - 1
    manifest = json.loads((phantom_cache.root / "manifest.json").read_text())
    assert manifest["settings"]["data"]["resolution"] == 32
    assert manifest["sites"]["site-0"]["train"]["patient_ids"] == split.patient_ids


def test_volumes_are_ordered_by_z_and_match_the_source(
    phantom_cache: SliceCache, phantom_dir: Path
) -> None:
    split = phantom_cache.split("site-1", "val")
    (pid, images, labels), *_ = list(split.volumes())
    z = np.sort(split.z[split.patient == split.patient_ids.index(pid)])
    assert images.shape == labels.shape == (len(z), 32, 32)
    case = next(c for c in read_task(phantom_dir).cases if c.case_id == pid)
    volume = load_case(case)
    has_liver = (volume.label > 0).any(axis=(0, 1))
    assert labels.any(axis=(1, 2)).tolist() == has_liver[z].tolist()  # same slices, same order
    assert has_liver.sum() <= len(z) < volume.label.shape[2]  # foreground + some empty


def test_test_cases_keep_every_slice_and_their_native_grid(
    phantom_cache: SliceCache, phantom_dir: Path
) -> None:
    cases = {c.case_id: c for c in read_task(phantom_dir).cases}
    split = phantom_cache.split("site-1", "test")
    assert split.patient_ids and set(split.native) == set(split.patient_ids)
    for pid, images, _ in split.volumes():
        volume = load_case(cases[pid])
        grid = split.native[pid]
        assert grid.shape == volume.label.shape and grid.spacing == volume.spacing
        assert len(images) == volume.label.shape[2]  # every slice, whatever the slice policy
        assert np.array_equal(grid.label(), volume.label > 0)
        assert grid.label_path is not None and grid.label_path.stat().st_mode & 0o777 == 0o600
    # training cases record their grid but keep no native label
    train = phantom_cache.split("site-1", "train")
    assert all(g.label_path is None for g in train.native.values())
    assert set(train.native) == set(train.patient_ids)


def test_a_cache_of_the_previous_format_is_rebuilt(phantom_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare_cache(phantom_dir, out, SMALL, seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(DataError, match="version"):
        SliceCache.open(out)
    again = prepare_cache(phantom_dir, out, SMALL, seed=0)
    assert not again.reused and again.manifest["version"] == cache_module.FORMAT_VERSION


def test_concat_pools_sites_and_renumbers_patients(phantom_cache: SliceCache) -> None:
    parts = [phantom_cache.split(s, "train") for s in phantom_cache.sites]
    pooled = SliceSplit.concat(parts)
    assert len(pooled) == sum(len(p) for p in parts)
    assert pooled.patient_ids == [pid for p in parts for pid in p.patient_ids]
    for i, pid in enumerate(pooled.patient_ids):
        part = next(p for p in parts if pid in p.patient_ids)
        rows = pooled.patient == i
        assert rows.sum() == (part.patient == part.patient_ids.index(pid)).sum()


def test_second_prepare_reuses_and_changed_setting_rebuilds(
    phantom_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    first = prepare_cache(phantom_dir, out, SMALL, seed=0)
    assert not first.reused
    before, n_first = _mtimes(out), len(first.split("site-0", "train"))
    again = prepare_cache(phantom_dir, out, SMALL, seed=0)
    assert again.reused and _mtimes(out) == before
    all_slices = replace(SMALL, slice_policy="all")
    changed = prepare_cache(phantom_dir, out, all_slices, seed=0)
    assert not changed.reused and _mtimes(out) != before
    assert len(changed.split("site-0", "train")) > n_first
    reseeded = prepare_cache(
        phantom_dir, out, DataConfig(resolution=16, slice_policy="all"), seed=1
    )
    assert not reseeded.reused


def test_interrupted_prepare_leaves_previous_cache_intact(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache"
    prepare_cache(phantom_dir, out, SMALL, seed=0)
    before = _mtimes(out)
    calls = []
    real = prepare_module._slice_case

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_slice_case", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(phantom_dir, out, DataConfig(resolution=24), seed=0)
    assert SliceCache.open(out).resolution == 16 and _mtimes(out) == before
    fresh = tmp_path / "fresh"
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(phantom_dir, fresh, SMALL, seed=0)
    with pytest.raises(DataError, match="manifest.json"):
        SliceCache.open(fresh)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no partial folder left behind


def test_open_rejects_missing_or_corrupt_manifest(phantom_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        SliceCache.open(tmp_path)
    out = tmp_path / "cache"
    prepare_cache(phantom_dir, out, SMALL, seed=0)
    (out / "manifest.json").write_text('{"version": 1, "sites"')
    with pytest.raises(DataError, match="manifest.json is not valid JSON"):
        SliceCache.open(out)
    rebuilt = prepare_cache(phantom_dir, out, SMALL, seed=0)  # a corrupt cache is not trusted
    assert not rebuilt.reused and SliceCache.open(out).sites == rebuilt.sites
    (out / "site-0" / "val" / "labels.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="labels.npy"):
        rebuilt.split("site-0", "val")


def test_refuses_to_overwrite_a_folder_that_is_not_a_cache(
    phantom_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="privseg did not create it"):
        prepare_cache(phantom_dir, tmp_path, SMALL, seed=0)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_non_iid_partition_shifts_site_intensities(phantom_dir: Path, tmp_path: Path) -> None:
    cfg = DataConfig(resolution=16, slice_policy="all", partition="non-iid")
    skew = prepare_cache(phantom_dir, tmp_path / "skew", cfg, seed=0)
    shifts = skew.manifest["intensity_shift"]
    assert set(shifts) == set(skew.sites) == {"site-0", "site-1", "site-2"}
    assert len({tuple(v) for v in shifts.values()}) == 3
    sizes = [sum(c["patients"] for c in skew.counts()[s].values()) for s in skew.sites]
    assert sum(sizes) == 12 and min(sizes) >= 3
    cases = {c.case_id: c for c in read_task(phantom_dir).cases}
    for site in skew.sites:
        split = skew.split(site, "train")
        pid, images, _ = next(split.volumes())
        scale, offset = shifts[site]
        hu = load_case(cases[pid]).image
        expected = image_to_model_input(hu * scale + offset, cfg).astype(np.float16)
        assert np.array_equal(images, expected)
        assert not np.array_equal(images, image_to_model_input(hu, cfg).astype(np.float16))
    iid = prepare_cache(phantom_dir, tmp_path / "iid", replace(cfg, partition="iid"), seed=0)
    assert iid.manifest["intensity_shift"] == {}


def test_a_site_too_small_for_a_validation_split_still_prepares(tmp_path):
    """2 patients a site: one trains, one tests, none validates (was a reshape traceback)."""
    task = synth_task(tmp_path / "task", sites=2, patients_per_site=2, size=32, slices=8)
    cache = prepare_cache(task, tmp_path / "cache", DataConfig(resolution=16, sites=2), seed=0)
    counts = cache.counts()
    assert all(counts[s]["val"]["slices"] == 0 for s in cache.sites), counts
    assert all(counts[s]["train"]["slices"] > 0 for s in cache.sites), counts
