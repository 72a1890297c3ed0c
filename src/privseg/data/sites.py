"""Which hospital (site) each patient belongs to, and each site's train/val/test split.

Everything is by patient: all slices of a patient live in exactly one site and one split, so
no patient is seen in training and evaluation, and a DP "patient" unit is well defined.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from privseg.core.errors import DataError
from privseg.core.io import read_json_object
from privseg.core.output import check_site_name

SPLITS = ("train", "val", "test")
SITE_MAP_FILE = "sites.json"
# Non-IID sites get at least this many patients, so train, val and test can each get one.
MIN_SITE_PATIENTS = 3
# Site names become folder names in caches and run folders: no separators, no '.'/'..'.


def site_name(index: int) -> str:
    return f"site-{index}"


def site_names(n_sites: int) -> list[str]:
    return [site_name(i) for i in range(n_sites)]


def load_site_map(path: str | Path) -> dict[str, str]:
    """Read a patient -> site map from JSON (``{"case": "site"}``) or CSV (``case_id,site``)."""
    path = Path(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        return _read_csv_map(path)
    raw = read_json_object(path, "site map", "does not exist")
    if not all(isinstance(v, str) and v for v in raw.values()):
        raise DataError(f'site map {path}: expected a JSON object {{"case_id": "site", ...}}')
    return {str(k): check_site_name(v, f"site map {path}") for k, v in raw.items()}


def _read_csv_map(path: Path) -> dict[str, str]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"site map {path} is not a readable CSV file: {exc}") from exc
    if not rows or not {"case_id", "site"} <= set(rows[0]):
        raise DataError(f"site map {path}: expected a CSV with header 'case_id,site'")
    out = {}
    for line, row in enumerate(rows, start=2):
        case, site = (row.get("case_id") or "").strip(), (row.get("site") or "").strip()
        if not case or not site:
            raise DataError(f"site map {path} line {line}: empty case_id or site")
        out[case] = check_site_name(site, f"site map {path} line {line}")
    return out


def assign_sites(
    case_ids: Sequence[str],
    n_sites: int,
    partition: str,
    seed: int,
    mapping: dict[str, str] | str | Path | None = None,
) -> dict[str, list[str]]:
    """Site name -> sorted patient ids.

    ``partition``: "mapping" (``mapping``: a dict, or a JSON/CSV file), "iid" (seeded, equal
    sizes) or "non-iid" (seeded, unequal Dirichlet sizes, each site keeping at least
    ``MIN_SITE_PATIENTS`` when possible).
    """
    ids = sorted(case_ids)
    if isinstance(mapping, str | Path):
        mapping = load_site_map(mapping)
    if partition == "mapping":
        if mapping is None:
            raise DataError("partition 'mapping' needs a site map (data.site_map or sites.json)")
        sites = _from_mapping(ids, n_sites, mapping)
    elif partition in ("iid", "non-iid"):
        order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        sizes = (
            _iid_sizes(len(ids), n_sites)
            if partition == "iid"
            else _skewed_sizes(len(ids), n_sites, seed)
        )
        bounds = np.cumsum([0, *sizes])
        sites = {
            name: sorted(order[bounds[i] : bounds[i + 1]])
            for i, name in enumerate(site_names(n_sites))
        }
    else:
        raise DataError(f"partition {partition!r} is unknown; expected mapping, iid or non-iid")
    empty = [s for s, members in sites.items() if not members]
    if empty:
        raise DataError(
            f"site {empty[0]!r} has no patients ({len(ids)} patients over {n_sites} sites, "
            f"partition {partition}); use fewer sites"
        )
    return sites


def _from_mapping(ids: list[str], n_sites: int, mapping: dict[str, str]) -> dict[str, list[str]]:
    missing = [c for c in ids if c not in mapping]
    if missing:
        raise DataError(f"site map has no site for patient(s) {missing[:5]}; every case needs one")
    names = sorted({check_site_name(s, "site map") for s in mapping.values()})
    if n_sites != len(names):
        raise DataError(
            f"site map defines {len(names)} sites ({', '.join(names)}) but data.sites = {n_sites}; "
            f"set data.sites = {len(names)} or data.partition = iid"
        )
    return {s: sorted(c for c in ids if mapping[c] == s) for s in names}


def _iid_sizes(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _skewed_sizes(n: int, k: int, seed: int) -> list[int]:
    """Unequal sizes: a floor per site, the rest spread by Dirichlet(1) proportions."""
    floor = min(MIN_SITE_PATIENTS, n // k)
    rest = n - floor * k
    if rest <= 0:
        return _iid_sizes(n, k)
    rng = np.random.default_rng([seed, 7])
    extra = rng.multinomial(rest, rng.dirichlet(np.ones(k)))
    return [floor + int(e) for e in extra]


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) patient counts: test >= 1, val >= 1 when asked and possible."""
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n >= 3 else 0
    n_val = min(n_val, max(0, n - n_test - 1))
    return n - n_test - n_val, n_val, n_test


def split_patients(
    site: str, patients: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Seeded train/val/test split of one site's patients."""
    n = len(patients)
    n_train, n_val, n_test = split_counts(n, val_fraction, test_fraction)
    if n_train < 1 or n_test < 1:
        raise DataError(
            f"site {site!r} has {n} patient(s): at least 2 are needed for a non-empty train and "
            f"test split (test_fraction {test_fraction:g} -> {n_test} test, {n_train} train)"
        )
    rng = np.random.default_rng([seed, stable_hash(site)])
    order = [sorted(patients)[i] for i in rng.permutation(n)]
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def site_intensity(sites: Sequence[str], seed: int) -> dict[str, tuple[float, float]]:
    """Per-site (scale, offset HU), seeded: the scanner shift a non-IID partition simulates."""
    out = {}
    for site in sites:
        rng = np.random.default_rng([seed, stable_hash(site), 11])
        out[site] = (float(rng.uniform(0.9, 1.1)), float(rng.uniform(-30.0, 30.0)))
    return out


def stable_hash(text: str) -> int:
    """A seed from a string that does not change between runs (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
