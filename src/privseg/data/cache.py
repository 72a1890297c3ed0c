"""Per-site, per-split 2D slice caches built once from an MSD task folder.

Layout: ``out/manifest.json`` and ``out/<site>/<split>/{images,labels,patient,z}.npy``; test
splits keep every slice of a case and its binary label on the original grid
(``out/<site>/test/native/<index>.npz``, mode 0600), so metrics can be computed there in mm.
The manifest records each case's original grid (shape and spacing in canonical RAS). The
manifest holds a fingerprint of the source files and the settings; a prepare with the same
fingerprint reuses the cache, anything else rebuilds it. The folder is built under a temporary
name and renamed into place, so an interrupted prepare never leaves a cache that is trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privseg.config import Config, DataConfig
from privseg.data.msd import DATASET_JSON, Case, MSDTask, load_case, read_task
from privseg.data.preprocess import map_labels, volume_to_slices
from privseg.data.sites import (
    SITE_MAP_FILE,
    SPLITS,
    assign_sites,
    load_site_map,
    site_intensity,
    split_patients,
    stable_hash,
)
from privseg.errors import DataError
from privseg.io import atomic_directory, write_json
from privseg.progress import Progress

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-case original grid, test splits with every slice + native labels
ARRAYS = ("images", "labels", "patient", "z")
NATIVE_DIR = "native"
EVALUATED_SPLIT = "test"
"""The split whose cases keep every slice and their label on the original grid."""


@dataclass(frozen=True)
class NativeGrid:
    """A case's original voxel grid in canonical RAS (the orientation the cache slices in).

    ``shape`` is ``[X, Y, Z]``, ``spacing`` the voxel size in mm per axis; ``label_path`` (test
    cases only) holds its binary foreground label on that grid.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    label_path: Path | None = None

    def label(self) -> np.ndarray:
        """The binary foreground label, bool ``[X, Y, Z]`` on the original grid."""
        if self.label_path is None:
            raise DataError("this case has no label on its original grid in the cache")
        try:
            with np.load(self.label_path) as data:
                label = data["label"].astype(bool)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise DataError(f"cache file {self.label_path} is missing or corrupt: {exc}") from exc
        if label.shape != self.shape:
            raise DataError(f"{self.label_path}: shape {label.shape}, manifest says {self.shape}")
        return label


@dataclass
class SliceSplit:
    """The slices of one site's split; ``patient`` indexes ``patient_ids``."""

    site: str
    images: np.ndarray  # float16 [N, R, R] in [0, 1], memory-mapped when read from a cache
    labels: np.ndarray  # uint8 [N, R, R], 0/1
    patient: np.ndarray  # int [N]
    z: np.ndarray  # int [N], slice index in the canonical volume
    patient_ids: list[str]
    native: dict[str, NativeGrid] = dataclasses.field(default_factory=dict)  # by patient id

    def __len__(self) -> int:
        return len(self.images)

    def volumes(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Yield ``(patient_id, images [Z, R, R], labels [Z, R, R])`` per patient, ordered by z."""
        for index, pid in enumerate(self.patient_ids):
            rows = np.flatnonzero(self.patient == index)
            if len(rows):
                rows = rows[np.argsort(self.z[rows], kind="stable")]
                yield pid, np.asarray(self.images[rows]), np.asarray(self.labels[rows])

    @classmethod
    def concat(cls, splits: Sequence[SliceSplit]) -> SliceSplit:
        """Pool splits (central training); patient indices are renumbered, ids kept."""
        if not splits:
            raise ValueError("SliceSplit.concat needs at least one split")
        offsets = np.cumsum([0] + [len(s.patient_ids) for s in splits[:-1]])
        return cls(
            site="+".join(s.site for s in splits),
            images=np.concatenate([s.images for s in splits]),
            labels=np.concatenate([s.labels for s in splits]),
            patient=np.concatenate([s.patient + o for s, o in zip(splits, offsets, strict=True)]),
            z=np.concatenate([s.z for s in splits]),
            patient_ids=[pid for s in splits for pid in s.patient_ids],
            native={pid: g for s in splits for pid, g in s.native.items()},
        )


class SliceCache:
    """A prepared cache folder, opened after its manifest has been checked."""

    def __init__(self, root: Path, manifest: dict[str, Any], *, reused: bool = False) -> None:
        self.root = root
        self.manifest = manifest
        self.reused = reused  # True when prepare_cache found a matching cache and built nothing

    @classmethod
    def open(cls, root: str | Path) -> SliceCache:
        root = Path(root)
        return cls(root, _read_manifest(root))

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def resolution(self) -> int:
        return int(self.manifest["settings"]["data"]["resolution"])

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """site -> split -> {"patients", "slices", "foreground"} from the manifest."""
        return {
            site: {
                k: {n: v[n] for n in ("patients", "slices", "foreground")} for k, v in sp.items()
            }
            for site, sp in self.manifest["sites"].items()
        }

    def split(self, site: str, split: str) -> SliceSplit:
        if site not in self.manifest["sites"]:
            raise DataError(f"cache {self.root} has no site {site!r}; sites: {self.sites}")
        if split not in SPLITS:
            raise DataError(f"split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
        folder = self.root / site / split
        arrays = {}
        for name in ARRAYS:
            path = folder / f"{name}.npy"
            try:
                arrays[name] = np.load(path, mmap_mode="r" if name == "images" else None)
            except (OSError, ValueError, EOFError) as exc:
                raise DataError(f"cache file {path} is missing or corrupt: {exc}") from exc
        if len({len(a) for a in arrays.values()}) != 1:
            raise DataError(f"cache folder {folder}: arrays have different lengths")
        entry = self.manifest["sites"][site][split]
        ids = list(entry["patient_ids"])
        return SliceSplit(
            site=site, patient_ids=ids, native=_native_grids(folder, entry, ids), **arrays
        )


def _native_grids(folder: Path, entry: dict[str, Any], ids: list[str]) -> dict[str, NativeGrid]:
    """Each case's original grid from the manifest, with its native label file when stored."""
    grids = {}
    for index, pid in enumerate(ids):
        case = entry["cases"][pid]
        label = folder / NATIVE_DIR / f"{index}.npz" if case.get("native_label") else None
        grids[pid] = NativeGrid(
            shape=tuple(int(n) for n in case["shape"]),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in case["spacing"]),  # type: ignore[arg-type]
            label_path=label,
        )
    return grids


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing: {root} is not a prepared slice cache")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is corrupt (not valid JSON): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a privseg cache manifest of version {FORMAT_VERSION}")
    for key in ("fingerprint", "settings", "sites"):
        if key not in manifest:
            raise DataError(f"{path}: field {key!r} is missing")
    return manifest


def resolve_cache(
    data: str | Path, cfg: Config, work_dir: Path, progress: Progress | None = None
) -> SliceCache:
    """Open a prepared slice cache, or prepare one from an MSD task folder into ``work_dir``."""
    data = Path(data)
    if (data / MANIFEST).is_file():
        return SliceCache.open(data)
    if (data / DATASET_JSON).is_file():
        return prepare_cache(data, work_dir, cfg.data, seed=cfg.seed, progress=progress)
    raise DataError(
        f"{data} is neither a prepared cache ({MANIFEST}) nor an MSD task folder "
        "(dataset.json); run `privseg data prepare` or `privseg data synth` first"
    )


# ---- building ----------------------------------------------------------------------------
def prepare_cache(
    src: str | Path,
    out: str | Path,
    cfg: DataConfig,
    *,
    seed: int,
    progress: Progress | None = None,
) -> SliceCache:
    """Build (or reuse) the slice cache of task ``src`` in ``out``.

    ``progress(description, done, total)`` is called after each patient when given.
    """
    task = read_task(src)
    out = Path(out)
    site_map = _site_map(task, cfg)
    partition = _partition(cfg, site_map)
    settings = {
        "data": dataclasses.asdict(cfg),
        "seed": seed,
        "partition": partition,
        "site_map": site_map,
    }
    fingerprint = _fingerprint(task, settings)
    reused = _reusable(out, fingerprint)
    if reused is not None:
        log.info("slice cache %s is up to date; reusing it", out)
        return reused
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / MANIFEST).exists():
        raise DataError(f"{out} exists and is not a slice cache; refusing to overwrite it")

    sites = assign_sites([c.case_id for c in task.cases], cfg.sites, partition, seed, site_map)
    splits = {
        s: split_patients(s, ids, cfg.val_fraction, cfg.test_fraction, seed)
        for s, ids in sites.items()
    }
    shift = site_intensity(list(sites), seed) if partition == "non-iid" else {}
    with atomic_directory(out) as tmp:
        summary = _build(task, splits, shift, cfg, seed, tmp, progress)
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
            },
        )
    return SliceCache.open(out)


def _site_map(task: MSDTask, cfg: DataConfig) -> dict[str, str] | None:
    if cfg.site_map:
        return load_site_map(cfg.site_map)
    if cfg.partition in ("auto", "mapping") and (task.root / SITE_MAP_FILE).is_file():
        return load_site_map(task.root / SITE_MAP_FILE)
    return None


def _partition(cfg: DataConfig, site_map: dict[str, str] | None) -> str:
    if cfg.partition == "auto":
        return "mapping" if site_map is not None else "iid"
    if cfg.partition == "mapping" and site_map is None:
        raise DataError(
            "data.partition = 'mapping' but there is no site map: set data.site_map or add "
            f"{SITE_MAP_FILE} to the task folder"
        )
    return cfg.partition


def _fingerprint(task: MSDTask, settings: dict[str, Any]) -> str:
    """Hash of dataset.json's bytes, each case file's size and mtime, and the settings.

    Hashing every volume would cost as much as reading it; size + mtime catch re-written files.
    """
    h = hashlib.sha256()
    h.update((task.root / DATASET_JSON).read_bytes())
    for case in task.cases:
        for path in (case.image, case.label):
            st = path.stat()
            h.update(f"{path.relative_to(task.root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _reusable(out: Path, fingerprint: str) -> SliceCache | None:
    try:
        manifest = _read_manifest(out)
    except DataError:
        return None
    if manifest["fingerprint"] != fingerprint:
        return None
    return SliceCache(out, manifest, reused=True)


def _build(
    task: MSDTask,
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
                    cases[pid], index, cfg, seed, shift.get(site), native=split == EVALUATED_SPLIT
                )
                parts.append(part)
                done += 1
                if progress is not None:
                    progress(f"slicing {site}/{split}", done, total)
            summary[site][split] = _write_split(tmp / site / split, parts, ids, cfg.resolution)
    return summary


def _slice_case(
    case: Case,
    index: int,
    cfg: DataConfig,
    seed: int,
    shift: tuple[float, float] | None,
    *,
    native: bool = False,
) -> dict[str, Any]:
    """One case's slices; with ``native`` (test cases) every slice, and its binary label on
    the original grid, so predictions can be mapped back and scored there."""
    volume = load_case(case)
    image = volume.image if shift is None else volume.image * shift[0] + shift[1]
    rng = np.random.default_rng([seed, stable_hash(case.case_id)])
    policy = dataclasses.replace(cfg, slice_policy="all") if native else cfg
    images, labels, z = volume_to_slices(image, volume.label, policy, rng=rng)
    return {
        "images": images.astype(np.float16),
        "labels": labels,
        "patient": np.full(len(z), index, dtype=np.int32),
        "z": z,
        "case": {"shape": list(volume.label.shape), "spacing": list(volume.spacing)},
        "native_label": map_labels(volume.label, cfg.labels) if native else None,
    }


def _write_native_label(path: Path, label: np.ndarray) -> None:
    """A test case's binary label on its original grid: compressed, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        np.savez_compressed(fh, label=label.astype(np.uint8))


def _write_split(folder: Path, parts: list[dict[str, Any]], ids: list[str], r: int) -> dict:
    folder.mkdir(parents=True)
    empty = {
        "images": np.zeros((0, r, r), np.float16),
        "labels": np.zeros((0, r, r), np.uint8),
        "patient": np.zeros(0, np.int32),
        "z": np.zeros(0, np.int32),
    }
    for name in ARRAYS:
        data = np.concatenate([p[name] for p in parts]) if parts else empty[name]
        np.save(folder / f"{name}.npy", data)
    labels = np.concatenate([p["labels"] for p in parts]) if parts else empty["labels"]
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
        "foreground": int(labels.reshape(len(labels), -1).any(axis=1).sum()),
    }
