"""Who the phantom's patients are: the sites' scanners, and a public population apart from them.

The sites' population stands for private hospital data. The public population stands for data
anyone may use (pretraining): its scanners are drawn from ranges that do not overlap the sites'
(calibration, noise, field of view, slice thickness, blur) and its patients are smaller or
larger than the sites' (a body-size factor), from another random stream, so a model pretrained
on it has not seen the sites' test distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privseg.core.errors import ConfigError
from privseg.data.sites import site_name

SITES = "sites"
PUBLIC = "public"
POPULATIONS = (SITES, PUBLIC)
#: The public population's random streams are tagged with this, the sites' are not: no public
#: patient or scanner can be drawn from a site's stream, whatever the seed.
PUBLIC_STREAM = 7_000_001


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner differs: calibration, noise, geometry and stored orientation."""

    name: str
    hu_scale: float
    hu_offset: float
    noise: float  # HU standard deviation of the (correlated) noise
    fov: float  # in-plane field of view, mm
    thickness: float  # slice thickness, mm
    blur: float  # in-plane point-spread sigma, voxels (partial-volume effect)
    flip: bool  # stored with x and y reversed (LPS-like), as many DICOM converters write
    body: float = 1.0  # in-plane body size factor of its patients (the population's anatomy)


def scanner(index: int, seed: int) -> Scanner:
    """Site ``index``'s scanner; offsets step by ~12 HU between neighbouring sites."""
    rng = np.random.default_rng([seed, 1000, index])
    ladder = (0, 1, -1, 2, -2)[index % 5] * 12.0
    return Scanner(
        name=site_name(index),
        hu_scale=float(rng.uniform(0.94, 1.06)),
        hu_offset=ladder + float(rng.uniform(-4.0, 4.0)),
        noise=float(rng.uniform(8.0, 24.0)),
        fov=float(rng.uniform(350.0, 440.0)),
        thickness=float(rng.choice([2.5, 3.0, 4.0, 5.0])),
        blur=float(rng.uniform(0.5, 1.3)),
        flip=index % 2 == 1,
    )


def public_scanner(index: int, seed: int) -> Scanner:
    """Public scanner ``index``: every setting outside the sites' ranges (|offset| > 28 HU,
    scale outside 0.94-1.06, noise > 24 HU, field of view outside 350-440 mm, thickness not in
    2.5-5 mm, blur > 1.3 voxels) and patients 10-20 % smaller or larger than the sites'."""
    rng = np.random.default_rng([seed, PUBLIC_STREAM, 1000, index])
    side = 1.0 if index % 2 == 0 else -1.0  # alternate below / above the sites' ranges
    return Scanner(
        name=f"public-{index}",
        hu_scale=float(1.0 + side * rng.uniform(0.07, 0.12)),
        hu_offset=float(-side * rng.uniform(32.0, 45.0)),
        noise=float(rng.uniform(26.0, 36.0)),
        fov=float(rng.uniform(300.0, 340.0) if side > 0 else rng.uniform(450.0, 500.0)),
        thickness=float(rng.choice([1.25, 1.5, 2.0, 6.0])),
        blur=float(rng.uniform(1.4, 1.8)),
        flip=index % 2 == 0,
        body=float(1.0 - side * rng.uniform(0.1, 0.2)),  # smaller in a small field of view
    )


def population_scanner(population: str, index: int, seed: int) -> Scanner:
    """The scanner of site ``index`` of ``population`` (``sites`` or ``public``)."""
    check_population(population)
    return public_scanner(index, seed) if population == PUBLIC else scanner(index, seed)


def patient_stream(population: str, seed: int, site: int, patient: int) -> list[int]:
    """The seed sequence of one patient (the sites' is the historical ``[seed, site, p]``)."""
    check_population(population)
    base = [seed, site, patient]
    return [seed, PUBLIC_STREAM, site, patient] if population == PUBLIC else base


def check_population(population: str) -> None:
    if population not in POPULATIONS:
        raise ConfigError(
            f"population = {population!r} is invalid: allowed values are {', '.join(POPULATIONS)}"
        )
