"""Which data is public: the one place that decides whether a run's data releases no patient.

privseg's public phantom population (:mod:`privseg.data.scanners`) holds no real patient, so
training on it spends no one's privacy. A task folder's ``dataset.json`` may *claim* to be that
population (its :data:`~privseg.data.phantom.GENERATOR_KEY` record), but a claim is a file
anyone can copy into a real data set. So prepare believes it only after regenerating every
patient from the record and matching each case's content fingerprint (what the ledger keys a
patient by); a false claim is refused, and only a verified record reaches the cache manifest,
where :func:`public_data` reads it. Anything else is private data, recorded in the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from privseg.core.errors import DataError
from privseg.data.phantom import GENERATOR, GENERATOR_KEY, generate, generator_record
from privseg.data.scanners import PUBLIC
from privseg.data.task import Task, Volume

MANIFEST_KEY = "public_data"
"""The cache manifest's entry for a verified public population (absent otherwise)."""


def verified_public(task: Task, contents: Iterable[str]) -> dict[str, Any] | None:
    """The task's generator record when it claims the public population and every case in
    ``contents`` (content fingerprints) is a patient the generator gives; None when it makes no
    public claim. Raises DataError on a claim its voxels do not bear out."""
    raw = task.meta.get(GENERATOR_KEY)
    if raw is None:
        return None
    record = _parse(raw, task)
    if record["population"] != PUBLIC:
        return None
    expected = {
        Volume(case, hu.astype(np.float32), label, np.eye(4), (1.0, 1.0, 1.0)).content()
        for case, _, hu, label in generate(record)
    }
    foreign = [c for c in contents if c not in expected]
    if foreign:
        raise DataError(
            f"{task.index} claims to be privseg's public phantom ({GENERATOR_KEY} = {raw!r}), "
            f"but {len(foreign)} case(s) hold voxels that generator does not give: this data "
            f"is not public. Remove the {GENERATOR_KEY!r} entry (the data is then private and "
            "every release on it is recorded), or generate the task again with `privseg data "
            "synth --population public`"
        )
    return {**record, "verified": "every case regenerated and matched by content fingerprint"}


def public_data(cache: Any) -> dict[str, Any] | None:
    """The verified generator record of a cache prepared from privseg's public phantom (its
    runs release no patient: no ledger row, epsilon 0 by construction), else None."""
    record = cache.manifest.get(MANIFEST_KEY)
    if isinstance(record, dict) and record.get("population") == PUBLIC and "verified" in record:
        return record
    return None


def _parse(raw: Any, task: Task) -> dict[str, Any]:
    """The record with its types checked (a malformed claim is refused, never trusted)."""
    try:
        record = generator_record(
            population=str(raw["population"]),
            seed=int(raw["seed"]),
            sites=int(raw["sites"]),
            patients_per_site=int(raw["patients_per_site"]),
            size=int(raw["size"]),
            slices=int(raw["slices"]),
            organ=str(raw["organ"]),
        )
        same_generator = raw["generator"] == GENERATOR
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{task.index}: {GENERATOR_KEY} = {raw!r} is not a privseg generator record "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not same_generator:
        raise DataError(
            f"{task.index}: {GENERATOR_KEY} names generator {raw['generator']!r}; this privseg "
            f"regenerates {GENERATOR!r} only: generate the task again"
        )
    return record
