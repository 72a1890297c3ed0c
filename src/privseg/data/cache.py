"""Per-site, per-split 2D slice caches built once from a task folder (MSD, nnU-Net, DICOM).

Layout: ``out/manifest.json`` and ``out/<site>/<split>/{images,labels,patient,z}.npy``; test
splits keep every slice of a case and its binary label on the original grid
(``out/<site>/test/native/<index>.npz``, mode 0600), so metrics can be computed there in mm.
The manifest records each case's original grid (shape and spacing in canonical RAS) and its
in-plane transform to the model grid (:class:`~privseg.data.preprocess.PlaneTransform`). The
manifest holds a fingerprint of the source files and the settings; a prepare with the same
fingerprint reuses the cache, anything else rebuilds it. The folder is built under a temporary
name and renamed into place, so an interrupted prepare never leaves a cache that is trusted.
What the cache holds, by content, is :attr:`SliceCache.content_fingerprint` (each split's
arrays hashed when written, :func:`split_digest`): run folders record it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privseg.config import DataConfig
from privseg.core.classes import Classes
from privseg.core.errors import DataError
from privseg.core.io import read_json_object
from privseg.core.output import check_site_name
from privseg.data.preprocess import PlaneTransform, mask_to_image_space
from privseg.data.sites import SPLITS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# 2: per-case original grid, test splits with every slice + native labels; 3: per-case plane
# transform (data.spacing); 4: each case's content fingerprint (the privacy ledger's patient key)
FORMAT_VERSION = 4
ARRAYS = ("images", "labels", "patient", "z")
NATIVE_DIR = "native"
EVALUATED_SPLIT = "test"
"""The split whose cases keep every slice and their label on the original grid."""


@dataclass(frozen=True)
class NativeGrid:
    """A case's original voxel grid in canonical RAS (the orientation the cache slices in).

    ``shape`` is ``[X, Y, Z]``, ``spacing`` the voxel size in mm per axis; ``label_path`` (test
    cases only) holds its binary foreground label on that grid; ``plane`` is how its slices
    became model slices (``None``: the plain resize to R x R).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    label_path: Path | None = None
    plane: PlaneTransform | None = None

    def to_native(self, mask: np.ndarray) -> np.ndarray:
        """A model-grid mask ``[Z, R, R]`` of this case -> uint8 ``[X, Y, Z]`` on its grid
        (class bit sets, as the cache's labels)."""
        return mask_to_image_space(mask, self.shape, self.plane)

    def label(self) -> np.ndarray:
        """The label as class bit sets, uint8 ``[X, Y, Z]`` on the original grid."""
        if self.label_path is None:
            raise DataError("this case has no label on its original grid in the cache")
        try:
            with np.load(self.label_path) as data:
                label = data["label"].astype(np.uint8)  # format 3 wrote bool: bit 0
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
    labels: np.ndarray  # uint8 [N, R, R], class bit sets (one class: 0/1)
    patient: np.ndarray  # int [N]
    z: np.ndarray  # int [N], slice index in the canonical volume
    patient_ids: list[str]
    native: dict[str, NativeGrid] = dataclasses.field(default_factory=dict)  # by patient id
    contents: list[str] = dataclasses.field(default_factory=list)  # per patient_ids entry
    classes: Classes | None = None  # what the label bits mean (None: not from a cache)

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
            contents=[c for s in splits for c in s.contents],
            native={pid: g for s in splits for pid, g in s.native.items()},
            classes=splits[0].classes,
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
        return cls(root, read_manifest(root))

    def moved(self, root: Path) -> SliceCache:
        """This cache after its folder was moved to ``root`` (keeping a computed
        fingerprint: hashing a large cache twice costs seconds)."""
        cache = SliceCache(root, read_manifest(root))
        if "content_fingerprint" in self.__dict__ and cache.manifest == self.manifest:
            cache.__dict__["content_fingerprint"] = self.content_fingerprint
        return cache

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def classes(self) -> Classes:
        """The classes its labels were encoded with (``data.classes`` at prepare time)."""
        data = self.manifest["settings"]["data"]
        table = {str(k): list(v) for k, v in dict(data.get("classes") or {}).items()}
        return Classes.of(DataConfig(labels=list(data.get("labels") or []), classes=table))

    @functools.cached_property
    def content_fingerprint(self) -> str:
        """A hash of what the cache holds (every split's slices, labels and original grids,
        and what the label bits mean), not of where it came from or its files' times.

        Each split's arrays are hashed again here and compared with the digest prepare
        recorded: a cache whose files were changed after prepare is refused, never
        fingerprinted by its manifest alone."""
        data = self.manifest["settings"]["data"]
        h = hashlib.sha256()
        about = {"classes": data.get("classes"), "labels": data.get("labels")}
        h.update(json.dumps({**about, "sites": self.manifest["sites"]}, sort_keys=True).encode())
        for site, splits in sorted(self.manifest["sites"].items()):
            for split, entry in sorted(splits.items()):
                recorded, held = entry.get("sha256"), self._split_digest(site, split)
                if recorded != held:
                    raise DataError(
                        f"cache {self.root}: the files of {site}/{split} were changed after "
                        f"prepare (sha256 recorded {str(recorded)[:12]}, now {held[:12]}); "
                        "prepare the cache again"
                    )
        return h.hexdigest()

    def _split_digest(self, site: str, split: str) -> str:
        part = self.split(site, split)
        arrays = {name: np.asarray(getattr(part, name)) for name in ARRAYS}
        return split_digest(arrays, [g.label() for g in part.native.values() if g.label_path])

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

    def contents(self, site: str, split: str) -> list[str]:
        """The content fingerprints of a site's split's patients (from the manifest alone)."""
        if site not in self.manifest["sites"]:
            raise DataError(f"cache {self.root} has no site {site!r}; sites: {self.sites}")
        entry = self.manifest["sites"][site][split]
        return _contents(self.root / site / split, entry, list(entry["patient_ids"]))

    def split(self, site: str, split: str) -> SliceSplit:
        if site not in self.manifest["sites"]:
            raise DataError(f"cache {self.root} has no site {site!r}; sites: {self.sites}")
        if split not in SPLITS:
            raise DataError(f"split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
        folder = self.root / check_site_name(site, str(self.root / MANIFEST)) / split
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
            site=site,
            patient_ids=ids,
            native=_native_grids(folder, entry, ids),
            contents=_contents(folder, entry, ids),
            classes=self.classes,
            **arrays,
        )


def _contents(folder: Path, entry: dict[str, Any], ids: list[str]) -> list[str]:
    """Each case's content fingerprint (what the privacy ledger keys a patient by)."""
    out = []
    for pid in ids:
        value = entry["cases"].get(pid, {}).get("content")
        if not (isinstance(value, str) and len(value) == 64):
            raise DataError(
                f"{folder.parent.parent / MANIFEST}: case {pid!r} has no content fingerprint; "
                "prepare the cache again"
            )
        out.append(value)
    return out


def split_digest(arrays: dict[str, np.ndarray], native_labels: list[np.ndarray]) -> str:
    """The content hash of one split: its arrays and its cases' labels on the original grid."""
    h = hashlib.sha256()
    for name in ARRAYS:
        data = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{data.dtype.str}:{list(data.shape)}\n".encode())
        h.update(data.tobytes())
    for label in native_labels:
        data = np.ascontiguousarray(label, dtype=np.uint8)
        h.update(f"native:{list(data.shape)}\n".encode())
        h.update(data.tobytes())
    return h.hexdigest()


def _native_grids(folder: Path, entry: dict[str, Any], ids: list[str]) -> dict[str, NativeGrid]:
    """Each case's original grid from the manifest, with its native label file when stored."""
    grids = {}
    for index, pid in enumerate(ids):
        try:
            case = entry["cases"][pid]
            shape = tuple(int(n) for n in case["shape"])
            grids[pid] = NativeGrid(
                shape=shape,  # type: ignore[arg-type]
                spacing=tuple(float(v) for v in case["spacing"]),  # type: ignore[arg-type]
                label_path=folder / NATIVE_DIR / f"{index}.npz" if case["native_label"] else None,
                plane=PlaneTransform.from_dict(case["plane"], shape),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{folder.parent.parent / MANIFEST}: case {pid!r} has no valid original grid: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return grids


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    missing = f"is missing: {root} is not a prepared slice cache"
    manifest = read_json_object(path, "cache manifest", missing)
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a privseg cache manifest of version {FORMAT_VERSION}")
    for key in ("fingerprint", "settings", "sites"):
        if key not in manifest:
            raise DataError(f"{path}: field {key!r} is missing")
    if not isinstance(manifest["sites"], dict):
        raise DataError(f"{path}: field 'sites' must be an object site -> splits")
    for site in manifest["sites"]:
        check_site_name(site, str(path))
    return manifest
