"""Build a slice cache from a task folder (or reuse it when nothing changed); open or build.

The task folder may be any format :mod:`privseg.data.sources` reads (MSD, nnU-Net v2, DICOM
series); every case arrives as the same Volume, so there is one building path.

What a cache holds and how it is read is :mod:`privseg.data.cache`; this module writes it:
one pass over the cases, every site and split written into a staging folder, published whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from privseg.config import Config, DataConfig
from privseg.core.errors import ConfigError, DataError
from privseg.core.io import make_folder, write_json
from privseg.core.output import claimed_folder
from privseg.core.plugins import input_formats
from privseg.core.progress import Progress
from privseg.data.cache import (
    ARRAYS,
    EVALUATED_SPLIT,
    FORMAT_VERSION,
    MANIFEST,
    NATIVE_DIR,
    SliceCache,
    read_manifest,
    split_digest,
)
from privseg.data.nifti import check_label_values, replace_nan
from privseg.data.preprocess import PlaneTransform, map_labels, volume_to_slices
from privseg.data.public import MANIFEST_KEY as PUBLIC_DATA
from privseg.data.public import verified_public
from privseg.data.sites import (
    SITE_MAP_FILE,
    SPLITS,
    assign_sites,
    load_site_map,
    site_intensity,
    split_patients,
    stable_hash,
)
from privseg.data.sources import case_files, is_source, load_volume, read_source
from privseg.data.task import Case, Task

log = logging.getLogger(__name__)


def resolve_cache(
    data: str | Path,
    cfg: Config,
    work_dir: Path,
    progress: Progress | None = None,
    *,
    accept: Callable[[SliceCache], None] | None = None,
) -> SliceCache:
    """Open a prepared slice cache, or prepare one from a task folder into ``work_dir``.

    ``accept`` is called with the cache before it is used: a built cache is checked while
    it is still staged, so a refusal leaves ``work_dir`` as it was."""
    data = Path(data)
    if (data / MANIFEST).is_file():
        cache = SliceCache.open(data)
        if accept:
            accept(cache)
        return cache
    if is_source(data):
        return prepare_cache(
            data, work_dir, cfg.data, seed=cfg.seed, progress=progress, accept=accept
        )
    raise DataError(
        f"{data} is neither a prepared cache ({MANIFEST}) nor a task ({input_formats()}); run "
        "`privseg data prepare` or `privseg data synth` first"
    )


# ---- building ----------------------------------------------------------------------------
def prepare_cache(
    src: str | Path,
    out: str | Path,
    cfg: DataConfig,
    *,
    seed: int,
    progress: Progress | None = None,
    overwrite: bool = False,
    accept: Callable[[SliceCache], None] | None = None,
) -> SliceCache:
    """Build (or reuse) the slice cache of task ``src`` in ``out``.

    ``out`` is claimed through :mod:`privseg.core.output` (never a folder privseg did not write,
    unless ``overwrite``; never the task itself; one writer at a time).
    ``progress(description, done, total)`` is called after each patient when given.
    ``accept(cache)``, when given, may refuse the cache (reused, or built and still staged)
    by raising: nothing is then published.
    """
    task = read_source(src)
    out = Path(out)
    _check_labels(task, cfg)
    site_map = _site_map(task, cfg)
    partition = _partition(cfg, site_map)
    settings = {
        "data": dataclasses.asdict(cfg),
        "seed": seed,
        "partition": partition,
        "site_map": site_map,
    }
    fingerprint = _fingerprint(task, settings)
    inputs = [task.root, *([cfg.site_map] if cfg.site_map else [])]
    with claimed_folder(out, "cache", inputs=inputs, overwrite=overwrite) as claim:
        reused = _reusable(out, fingerprint)
        if reused is not None:
            log.info("slice cache %s is up to date; reusing it", out)
            if accept:
                accept(reused)
            return reused
        sites = assign_sites([c.case_id for c in task.cases], cfg.sites, partition, seed, site_map)
        if cfg.site_name:
            if partition == "mapping":
                raise DataError(
                    f"data.site_name = {cfg.site_name!r} conflicts with the site map "
                    f"({_site_map_source(task, cfg)}), which names the sites; "
                    "set data.partition = iid to name the one site yourself"
                )
            (ids,) = sites.values()  # data.site_name is only valid with data.sites = 1
            sites = {cfg.site_name: ids}
        splits = {
            s: split_patients(s, ids, cfg.val_fraction, cfg.test_fraction, seed)
            for s, ids in sites.items()
        }
        shift = site_intensity(list(sites), seed) if partition == "non-iid" else {}
        claim.check_free([MANIFEST, *splits])
        with claim.build(anchor=MANIFEST) as tmp:
            summary = _build(task, splits, shift, cfg, seed, tmp, progress)
            contents = [
                case["content"]
                for by_split in summary.values()
                for entry in by_split.values()
                for case in entry["cases"].values()
            ]
            public = verified_public(task, contents)
            write_json(
                tmp / MANIFEST,
                {
                    "version": FORMAT_VERSION,
                    "fingerprint": fingerprint,
                    "source": str(task.root.resolve()),
                    "task": task.name,
                    "settings": settings,
                    "intensity_shift": shift,
                    "sites": summary,
                    **({PUBLIC_DATA: public} if public else {}),
                },
            )
            staged = SliceCache.open(tmp)
            if accept:
                accept(staged)
    return staged.moved(out)


def _check_labels(task: Task, cfg: DataConfig) -> None:
    if task.labels is None:  # the format declares no labels (DICOM)
        return
    for field, value, values in (
        ("data.labels", cfg.labels, cfg.labels),
        ("data.classes", cfg.classes, [v for vs in cfg.classes.values() for v in vs]),
    ):
        undeclared = sorted(set(values) - set(task.labels))
        if undeclared:
            raise ConfigError(
                f"{field} = {value!r} is invalid for {task.index}: label "
                f"value(s) {undeclared} are not among its declared 'labels' "
                f"{dict(sorted(task.labels.items()))}"
            )


def _site_map(task: Task, cfg: DataConfig) -> dict[str, str] | None:
    """``data.site_map``, else the task's own: its index's (DICOM CSV ``site``), ``sites.json``."""
    if cfg.site_map:
        return load_site_map(cfg.site_map)
    if cfg.partition not in ("auto", "mapping"):
        return None
    if task.site_map is not None:
        return task.site_map
    if (task.root / SITE_MAP_FILE).is_file():
        return load_site_map(task.root / SITE_MAP_FILE)
    return None


def _site_map_source(task: Task, cfg: DataConfig) -> str:
    if cfg.site_map:
        return cfg.site_map
    return f"{task.index} 'site'" if task.site_map is not None else str(task.root / SITE_MAP_FILE)


def _partition(cfg: DataConfig, site_map: dict[str, str] | None) -> str:
    if cfg.partition == "auto":
        return "mapping" if site_map is not None else "iid"
    if cfg.partition == "mapping" and site_map is None:
        raise DataError(
            "data.partition = 'mapping' but there is no site map: set data.site_map or add "
            f"{SITE_MAP_FILE} to the task folder (or a 'site' column to a DICOM series.csv)"
        )
    return cfg.partition


def _fingerprint(task: Task, settings: dict[str, Any]) -> str:
    """Hash of the index's bytes (dataset.json, series.csv), each case file's size and mtime,
    and the settings.

    Hashing every volume would cost as much as reading it; size + mtime catch re-written files.
    """
    h = hashlib.sha256()
    h.update(task.kind.encode() + b"\n" + task.index.read_bytes())
    for case in task.cases:
        for path in case_files(task, case):
            st = path.stat()
            h.update(f"{path.relative_to(task.root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _reusable(out: Path, fingerprint: str) -> SliceCache | None:
    try:
        manifest = read_manifest(out)
    except DataError:
        return None
    if manifest["fingerprint"] != fingerprint:
        return None
    return SliceCache(out, manifest, reused=True)


def _build(
    task: Task,
    splits: dict[str, dict[str, list[str]]],
    shift: dict[str, tuple[float, float]],
    cfg: DataConfig,
    seed: int,
    tmp: Path,
    progress: Progress | None,
) -> dict[str, Any]:
    """Load each case once, slice it, and write every site/split's arrays into ``tmp``."""
    cases = {c.case_id: c for c in task.cases}
    total, done = sum(len(ids) for sp in splits.values() for ids in sp.values()), 0
    summary: dict[str, Any] = {}
    for site, by_split in splits.items():
        summary[site] = {}
        for split in SPLITS:
            ids = by_split[split]
            parts = []
            for index, pid in enumerate(ids):
                part = _slice_case(
                    cases[pid],
                    index,
                    task,
                    cfg,
                    seed,
                    shift.get(site),
                    native=split == EVALUATED_SPLIT,
                )
                parts.append(part)
                done += 1
                if progress is not None:
                    progress(f"slicing: {site}/{split}", done, total)
            if ids and not any(len(p["z"]) for p in parts):
                raise DataError(
                    f"site {site!r} {split} split: its {len(ids)} patient(s) "
                    f"({', '.join(ids[:5])}) "
                    f"have no slice with foreground for data.labels = {cfg.labels or 'all > 0'} "
                    f"and data.slice_policy = {cfg.slice_policy!r}; check the label files and "
                    "data.labels, or use data.slice_policy = 'all'"
                )
            summary[site][split] = _write_split(tmp / site / split, parts, ids, cfg.resolution)
    return summary


def _slice_case(
    case: Case,
    index: int,
    task: Task,
    cfg: DataConfig,
    seed: int,
    shift: tuple[float, float] | None,
    *,
    native: bool = False,
) -> dict[str, Any]:
    """One case's slices; with ``native`` (test cases) every slice, and its binary label on
    the original grid, so predictions can be mapped back and scored there."""
    volume = load_volume(task, case, cfg.max_voxels)
    content = volume.content()  # before any change to the voxels: the patient's identity
    check_label_values(volume.label, task.labels, case.label)
    image = replace_nan(volume.image, case.image, cfg.nan_hu)
    image = image if shift is None else image * shift[0] + shift[1]
    rng = np.random.default_rng([seed, stable_hash(case.case_id)])
    policy = dataclasses.replace(cfg, slice_policy="all") if native else cfg
    plane = PlaneTransform.of(volume.label.shape, volume.spacing, cfg)
    images, labels, z = volume_to_slices(image, volume.label, policy, rng=rng, plane=plane)
    return {
        "images": images.astype(np.float16),
        "labels": labels,
        "patient": np.full(len(z), index, dtype=np.int32),
        "z": z,
        "case": {
            "shape": list(volume.label.shape),
            "spacing": list(volume.spacing),
            "plane": plane.to_dict(),
            "content": content,
        },
        "native_label": map_labels(volume.label, cfg) if native else None,
    }


def _write_native_label(path: Path, label: np.ndarray) -> None:
    """A test case's binary label on its original grid: compressed, readable by the owner only."""
    make_folder(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        np.savez_compressed(fh, label=label.astype(np.uint8))


def _write_split(folder: Path, parts: list[dict[str, Any]], ids: list[str], r: int) -> dict:
    make_folder(folder)
    empty = {
        "images": np.zeros((0, r, r), np.float16),
        "labels": np.zeros((0, r, r), np.uint8),
        "patient": np.zeros(0, np.int32),
        "z": np.zeros(0, np.int32),
    }
    arrays = {n: np.concatenate([p[n] for p in parts]) if parts else empty[n] for n in ARRAYS}
    for name in ARRAYS:
        np.save(folder / f"{name}.npy", arrays[name])
    labels = arrays["labels"]
    cases = {}
    for index, (pid, part) in enumerate(zip(ids, parts, strict=True)):
        cases[pid] = {**part["case"], "native_label": part["native_label"] is not None}
        if part["native_label"] is not None:
            _write_native_label(folder / NATIVE_DIR / f"{index}.npz", part["native_label"])
    return {
        "patient_ids": ids,
        "cases": cases,
        "patients": len(ids),
        "slices": int(len(labels)),
        "foreground": int(np.any(labels, axis=tuple(range(1, labels.ndim))).sum()),
        "sha256": split_digest(
            arrays, [p["native_label"] for p in parts if p["native_label"] is not None]
        ),
    }
