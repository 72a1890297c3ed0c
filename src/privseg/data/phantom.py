"""A seeded multi-site abdominal CT phantom, written as an MSD task folder.

The real MSD data cannot be downloaded here, so tests and the demo need data that behaves like
it: organs with close HU (liver, spleen, muscle), noise, partial-volume blur, varying anatomy,
and sites that differ the way scanners do (calibration, noise, field of view, blur, slice
thickness, stored orientation). The anatomy is drawn in :mod:`privseg.data.anatomy`; who the
patients are (the sites, or a public population apart from them) in
:mod:`privseg.data.scanners`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from privseg.core.errors import ConfigError
from privseg.core.io import write_json
from privseg.core.output import claimed_folder
from privseg.core.progress import Progress
from privseg.data.anatomy import synth_patient
from privseg.data.msd import DATASET_JSON, write_dataset_json
from privseg.data.nifti import NIFTI_SUFFIX
from privseg.data.scanners import (
    PUBLIC,
    SITES,
    Scanner,
    check_population,
    patient_stream,
    population_scanner,
)
from privseg.data.sites import SITE_MAP_FILE

ORGANS = {
    "liver": {0: "background", 1: "liver", 2: "cancer"},
    "pancreas": {0: "background", 1: "pancreas", 2: "cancer"},
}


def synth_task(
    out: str | Path,
    *,
    sites: int = 3,
    patients_per_site: int = 10,
    seed: int = 0,
    size: int = 128,
    slices: int = 32,
    organ: str = "liver",
    population: str = SITES,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the phantom as an MSD task folder with ``sites.json``; returns the folder.

    ``population``: ``sites`` (stands for the hospitals' private data) or ``public`` (another
    random stream and scanners and anatomy outside the sites' ranges, see
    :mod:`privseg.data.scanners`). ``dataset.json`` records the generator's settings under
    :data:`GENERATOR_KEY`; prepare trusts a public claim only after regenerating it.
    ``out`` is claimed through :mod:`privseg.core.output`: a real task folder (or anything privseg
    did not write) is never replaced. ``progress(description, done, total)`` is called after
    each patient when given.
    """
    _check_args(sites, patients_per_site, size, slices, organ)
    check_population(population)
    record = generator_record(
        population=population,
        seed=seed,
        sites=sites,
        patients_per_site=patients_per_site,
        size=size,
        slices=slices,
        organ=organ,
    )
    out = Path(out)
    total = sites * patients_per_site
    site_of: dict[str, str] = {}
    with claimed_folder(out, "task", overwrite=overwrite) as claim:
        claim.check_free([DATASET_JSON, "imagesTr", "labelsTr", SITE_MAP_FILE])
        with claim.build(anchor=DATASET_JSON) as tmp:
            (tmp / "imagesTr").mkdir()
            (tmp / "labelsTr").mkdir()
            for case, sc, hu, label in generate(record):
                _save(tmp, case, hu, label, sc)
                site_of[case] = sc.name
                if progress is not None:
                    progress("synthesising phantom", len(site_of), total)
            public = " (public population)" if population == PUBLIC else ""
            write_dataset_json(
                tmp,
                name=f"Phantom{organ.capitalize()}{'Public' if public else ''}",
                labels=ORGANS[organ],
                case_ids=list(site_of),
                description=(
                    f"privseg synthetic multi-site abdominal CT phantom ({organ}), seed {seed}"
                    f"{public}"
                ),
                reference="privseg.data.phantom",
                licence="CC0-1.0",
                extra={GENERATOR_KEY: record},
            )
            write_json(tmp / SITE_MAP_FILE, site_of)
    return out


GENERATOR_KEY = "privseg_generator"
"""The ``dataset.json`` entry that records how privseg generated the task."""
GENERATOR = "privseg.data.phantom/1"  # bump when the same settings give other voxels


def generator_record(
    *,
    population: str,
    seed: int,
    sites: int,
    patients_per_site: int,
    size: int,
    slices: int,
    organ: str,
) -> dict[str, Any]:
    """Everything :func:`generate` needs to draw the same patients again."""
    return {
        "generator": GENERATOR,
        "population": population,
        "seed": seed,
        "sites": sites,
        "patients_per_site": patients_per_site,
        "size": size,
        "slices": slices,
        "organ": organ,
    }


def generate(record: dict[str, Any]) -> Iterator[tuple[str, Scanner, np.ndarray, np.ndarray]]:
    """``(case id, scanner, HU, label)`` of every patient of a :func:`generator_record`, in
    order; the same record always gives the same voxels (for one :data:`GENERATOR`)."""
    population, seed, organ = record["population"], int(record["seed"]), str(record["organ"])
    per_site = int(record["patients_per_site"])
    for s in range(int(record["sites"])):
        sc = population_scanner(population, s, seed)
        for p in range(per_site):
            rng = np.random.default_rng(patient_stream(population, seed, s, p))
            hu, label = synth_patient(
                rng, sc, size=int(record["size"]), slices=int(record["slices"]), organ=organ
            )
            yield f"{organ}_{s * per_site + p:03d}", sc, hu, label


def _check_args(sites: int, patients: int, size: int, slices: int, organ: str) -> None:
    rules = [
        ("sites", sites, 1),
        ("patients_per_site", patients, 1),
        ("size", size, 16),
        ("slices", slices, 4),
    ]
    for name, value, low in rules:
        if value < low:
            raise ConfigError(f"{name} = {value} is invalid: must be >= {low}")
    if organ not in ORGANS:
        raise ConfigError(f"organ = {organ!r} is invalid: allowed values are {', '.join(ORGANS)}")


def _save(root: Path, case: str, hu: np.ndarray, label: np.ndarray, sc: Scanner) -> None:
    size, _, slices = hu.shape
    sp = sc.fov / size
    affine = np.diag([sp, sp, sc.thickness, 1.0])
    affine[:3, 3] = [-(size - 1) / 2 * sp, -(size - 1) / 2 * sp, -(slices - 1) / 2 * sc.thickness]
    if sc.flip:
        hu, label = hu[::-1, ::-1], label[::-1, ::-1]
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = size - 1
        affine = affine @ flip
    for data, folder in ((hu, "imagesTr"), (label, "labelsTr")):
        img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, root / folder / f"{case}{NIFTI_SUFFIX}")
