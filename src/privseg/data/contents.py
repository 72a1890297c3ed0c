"""Which patients (by content fingerprint) each site of some data holds, for the ledger.

A prepared cache answers from its manifest; a task folder in any readable format (MSD,
nnU-Net v2, DICOM series) is read case by case, so ``privseg budget --data`` gives the same
answer for a task and for every cache prepared from it.
"""

from __future__ import annotations

from pathlib import Path

from privseg.config import DataConfig
from privseg.core.errors import DataError
from privseg.core.plugins import input_formats
from privseg.core.progress import Progress
from privseg.data.cache import MANIFEST, SliceCache
from privseg.data.sites import SITE_MAP_FILE, SPLITS, load_site_map
from privseg.data.sources import is_source, load_volume, read_source

ALL = "all"
"""The one group of a task folder that names no sites (no site map)."""


def patients_by_site(
    data: str | Path, max_voxels: int = DataConfig().max_voxels, progress: Progress | None = None
) -> dict[str, list[str]]:
    """Site -> content fingerprints of its patients (every split) in a cache or task folder
    (each volume read under ``max_voxels``, ``data.max_voxels``)."""
    data = Path(data)
    if (data / MANIFEST).is_file():
        cache = SliceCache.open(data)
        return {s: sorted({c for sp in SPLITS for c in cache.contents(s, sp)}) for s in cache.sites}
    if not is_source(data):
        raise DataError(
            f"{data} is neither a prepared cache ({MANIFEST}) nor a task ({input_formats()})"
        )
    task = read_source(data)
    site_map = task.site_map
    if site_map is None and (task.root / SITE_MAP_FILE).is_file():
        site_map = load_site_map(task.root / SITE_MAP_FILE)
    groups: dict[str, set[str]] = {}
    for done, case in enumerate(task.cases, 1):
        site = (site_map or {}).get(case.case_id, ALL)
        groups.setdefault(site, set()).add(load_volume(task, case, max_voxels).content())
        if progress is not None:
            progress("fingerprinting patients", done, len(task.cases))
    return {site: sorted(p) for site, p in sorted(groups.items())}
