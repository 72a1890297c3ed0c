"""The ``results.json`` schema: typed run and site results, the only writer of results.json.

Central, local-only and federated runs (simulation and deployment) and the study all build
their ``results.json`` here, so a key means the same in every file. The schema table in
docs/RESULTS.md is tested against :data:`RUN_KEYS` and :data:`SITE_KEYS`; each result is read
back typed (:meth:`RunResult.load`), a bad field refused with the file and field named.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from privseg.core.choices import MODES
from privseg.core.fields import INFINITE, Fields, read_fields
from privseg.core.io import write_json

CENTRAL, LOCAL, FEDERATED = MODES  # a run's ``mode``, named (choices.Mode spells them)
FEDERATED_DP = "federated_dp"
SETTINGS = (*MODES, FEDERATED_DP)
"""A study's training settings, in report order (``federated_dp``: one per study epsilon)."""

_number, _text = partial(Fields.number, optional=True), partial(Fields.text, optional=True)
_whole = partial(Fields.integer, optional=True)
_PRIVACY_READERS: dict[str, Callable[[Fields, str], Any]] = {
    "epsilon": Fields.epsilon,
    "epsilon_run": Fields.epsilon,
    "delta": _number,
    "unit": _text,
    "noise_multiplier": _number,
    "sample_rate": _number,
    "steps": _whole,
    "steps_lifetime": _whole,
    "max_grad_norm": _number,
    "accountant": _text,
    "budget_epsilon": _number,
    "budget_delta": _number,
    "releases": partial(Fields.items, optional=True),
}
PRIVACY_KEYS = tuple(_PRIVACY_READERS)
"""The privacy fields of every ``sites[]`` entry (None without DP). ``epsilon`` is what the
site's training patient who has spent most has spent over every release ever recorded on it
(recomputable from ``releases`` alone; the string ``"inf"`` after a release without DP);
``epsilon_run`` is this run's releases taken alone (what ``target_epsilon`` bounds); ``steps``
are this run's, ``steps_lifetime`` that patient's over every release."""


def epsilon_json(eps: Any) -> Any:
    """Epsilon for JSON: the number, or :data:`INFINITE` (``-inf`` for a remaining budget)."""
    if isinstance(eps, float) and math.isinf(eps):
        return INFINITE if eps > 0 else f"-{INFINITE}"
    return eps


SLICE_UNIT_NOTE = (
    "Privacy unit is one slice: epsilon bounds what leaks about any single slice, not about a "
    "patient, whose many correlated slices each count separately. Use privacy.unit = "
    '"patient" for a patient-level guarantee.'
)
"""What slice-level DP does not protect: results.json, the report and the run's warning."""

NATIVE_UNITS = "mm"
"""Units of HD95 / ASSD scored on each case's original grid (every test split of a cache)."""
MODEL_GRID_UNITS = "model-grid voxels"
"""Units of HD95 / ASSD scored on the resized model grid (pixels in-plane, slices across)."""

SITE_KEYS = (
    "name",
    "n_train",
    "dice",
    "dice_sd",
    "hd95",
    "hd95_units",
    "assd",
    "assd_units",
    "patients",
    "classes",
    *PRIVACY_KEYS,
)
SITE_OPTIONAL_KEYS = ("cross", "completed", "epsilon_lower_bound")
RUN_KEYS = (
    "mode",
    "dp",
    "unit",
    "target_epsilon",
    "sites",
    "dice_mean",
    "dice_sd",
    "classes",
    "hd95_units",
    "assd_units",
    "epsilon_max",
    "epsilon_run_max",
    "history",
    "seconds_per_epoch",
    "seconds_per_round",
    "wall_seconds",
    "compute",
)
FEDERATION_KEYS = ("strategy", "rounds", "local_steps", "secure_aggregation")
PROVENANCE_KEYS = (
    "privseg_version",
    "run_id",
    "cache_dir",
    "machine",
    "device",
    "privacy_note",
    "data_origin",
    "init",
)
"""``device``: where the run computed (``"cpu"``, ``"cuda:0 (NVIDIA H200)"``), from
``train.device``; absent where this process trained nothing (a deployment's server).
``data_origin``: ``{"kind": "private"}`` or the public phantom's (:data:`PUBLIC_ORIGIN`, its
generator record); ``init``: the ``train.init`` checkpoint's path, sha256 and lineage."""

PUBLIC_ORIGIN = "generated-public"  # data_origin.kind of privseg's public phantom
# A sites[] entry's privacy on the public phantom: epsilon 0 by construction (no patient was
# released), never a stand-in for a missing epsilon of private data.
PUBLIC_PRIVACY = {"epsilon": 0.0, "epsilon_run": 0.0, "steps": 0, "releases": []}


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the values that are not None or NaN; NaN when there are none."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if not arr.size or np.isnan(arr).all():
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))


def _largest(eps: Iterable[float | None]) -> float | None:
    """The largest epsilon that is known (never an average); None when none is."""
    known = [e for e in eps if e is not None]
    return max(known) if known else None


def as_float(value: Any) -> float:
    """A metric as a float (None and non-numbers become NaN, never 0)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class SiteResult:
    """One ``sites[]`` entry: a site's test metrics (per patient volume) and its privacy."""

    name: str
    n_train: int | None
    dice: float = math.nan
    dice_sd: float = math.nan
    hd95: float = math.nan
    assd: float = math.nan
    # Test metrics are scored on each case's original grid (mm): a site's scalar reply (which
    # cannot carry text) comes from a cache's test split, so "mm" unless the result says.
    hd95_units: str = NATIVE_UNITS
    assd_units: str = NATIVE_UNITS
    patients: list[dict[str, Any]] = field(default_factory=list)
    # per class (data.classes; one "foreground" by default): {name: {dice, dice_sd, hd95, assd}}
    classes: dict[str, dict[str, float]] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    cross: dict[str, float] | None = None  # local-only: Dice on the other sites' test splits
    completed: bool | None = None  # federated: the site answered the final test evaluation
    epsilon_lower_bound: bool | None = None  # federated: its last known epsilon, not its final

    @classmethod
    def from_test(
        cls, name: str, n_train: int | None, test: dict[str, Any], privacy: dict[str, Any] | None
    ) -> SiteResult:
        """From an ``evaluate_split`` dict (or a site's scalar reply) and a privacy summary."""
        return cls(
            name=name,
            n_train=n_train,
            dice=as_float(test.get("dice")),
            dice_sd=as_float(test.get("dice_sd")),
            hd95=as_float(test.get("hd95")),
            assd=as_float(test.get("assd")),
            hd95_units=str(test.get("hd95_units", NATIVE_UNITS)),
            assd_units=str(test.get("assd_units", NATIVE_UNITS)),
            patients=list(test.get("patients", [])),
            classes={
                str(n): {k: as_float(v) for k, v in m.items()}
                for n, m in dict(test.get("classes") or {}).items()
            },
            privacy=privacy,
        )

    @classmethod
    def from_fields(cls, f: Fields) -> SiteResult:
        """A ``sites[]`` entry read back (see :meth:`RunResult.load`)."""
        privacy = {k: _PRIVACY_READERS[k](f, k) for k in PRIVACY_KEYS}
        classes, cross = f.sub("classes"), f.sub("cross", optional=True)
        return cls(
            name=f.text("name"),
            n_train=f.integer("n_train", optional=True),
            dice=f.metric("dice"),
            dice_sd=f.metric("dice_sd"),
            hd95=f.metric("hd95"),
            assd=f.metric("assd"),
            hd95_units=f.text("hd95_units"),
            assd_units=f.text("assd_units"),
            patients=[p.data for p in f.each("patients")],
            classes={n: classes.sub(n).metrics() for n in classes.data},
            privacy=privacy if any(v is not None for v in privacy.values()) else None,
            cross=None if cross is None else cross.metrics(),
            completed=f.flag("completed", optional=True),
            epsilon_lower_bound=f.flag("epsilon_lower_bound", optional=True),
        )

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "n_train": self.n_train,
            "dice": self.dice,
            "dice_sd": self.dice_sd,
            "hd95": self.hd95,
            "hd95_units": self.hd95_units,
            "assd": self.assd,
            "assd_units": self.assd_units,
            "patients": self.patients,
            "classes": self.classes,
        }
        if self.completed is not None:
            entry["completed"] = self.completed
        if self.epsilon_lower_bound is not None:
            entry["epsilon_lower_bound"] = self.epsilon_lower_bound
        for key in PRIVACY_KEYS:
            value = self.privacy.get(key) if self.privacy else None
            entry[key] = epsilon_json(value) if key in ("epsilon", "epsilon_run") else value
        if self.cross is not None:
            entry["cross"] = self.cross
        return entry


@dataclass
class RunResult:
    """One training run's ``results.json`` (central, local-only or federated)."""

    mode: str
    dp: bool
    unit: str | None
    target_epsilon: float | None
    sites: list[SiteResult]
    history: list[dict[str, Any]]
    seconds_per_epoch: float | None = None
    seconds_per_round: float | None = None
    wall_seconds: float = math.nan
    # per site: sequential_steps, batch_size, slices_per_site (see privseg.runs.compute)
    compute: dict[str, Any] | None = None
    federation: dict[str, Any] | None = None  # FEDERATION_KEYS, federated runs only
    provenance: dict[str, Any] = field(default_factory=dict)  # PROVENANCE_KEYS

    @classmethod
    def of(
        cls, privacy: Any, mode: str, sites: list[SiteResult], history: list[dict[str, Any]]
    ) -> RunResult:
        """A result whose DP fields come from the run's ``privacy`` config section."""
        dp = bool(privacy.enabled)
        return cls(
            mode=mode,
            dp=dp,
            unit=privacy.unit if dp else None,
            target_epsilon=privacy.target_epsilon if dp else None,
            sites=sites,
            history=history,
        )

    @classmethod
    def load(cls, path: Path) -> RunResult:
        """A run's ``results.json`` read back; a bad field is a DataError naming it."""
        return cls.from_fields(read_fields(path))

    @classmethod
    def from_fields(cls, f: Fields) -> RunResult:
        """The typed fields of a run (derived ones, like ``dice_mean``, are recomputed)."""
        federation = (
            {
                "strategy": f.text("strategy"),
                "rounds": f.integer("rounds"),
                "local_steps": f.integer("local_steps"),
                "secure_aggregation": f.flag("secure_aggregation"),
            }
            if "strategy" in f.data
            else None
        )
        return cls(
            mode=f.one_of("mode", MODES),
            dp=f.flag("dp"),
            unit=f.text("unit", optional=True),
            target_epsilon=f.number("target_epsilon", optional=True),
            sites=[SiteResult.from_fields(s) for s in f.each("sites")],
            history=[h.data for h in f.each("history")],
            seconds_per_epoch=f.number("seconds_per_epoch", optional=True),
            seconds_per_round=f.number("seconds_per_round", optional=True),
            wall_seconds=f.metric("wall_seconds"),
            compute=f.mapping("compute", optional=True),
            federation=federation,
            provenance={  # privacy_note is derived from dp and unit, like dice_mean
                k: f.data[k] for k in PROVENANCE_KEYS if k in f.data and k != "privacy_note"
            },
        )

    def site(self, name: str) -> SiteResult | None:
        return next((s for s in self.sites if s.name == name), None)

    @property
    def cache_dir(self) -> Path | None:
        """The slice cache the run trained on (absent from a deployment's server)."""
        cache = self.provenance.get("cache_dir")
        return Path(cache) if cache else None

    def _dice(self) -> list[float]:
        pooled = [p["dice"] for s in self.sites for p in s.patients]
        return pooled or [s.dice for s in self.sites]

    @property
    def dice_mean(self) -> float:
        """Over all test patient volumes of all sites (site means when no patient is known)."""
        return nanmean(self._dice())

    @property
    def dice_sd(self) -> float:
        dice = self._dice()
        return float(np.nanstd(dice)) if dice else math.nan

    @property
    def classes(self) -> dict[str, dict[str, float]]:
        """Per class: Dice mean and SD over all test patient volumes (site means when no
        patient carries the class's own Dice, as in a deployment's scalar replies)."""
        names = list(dict.fromkeys(n for s in self.sites for n in s.classes))
        out = {}
        for name in names:
            dice = [
                p["classes"][name]["dice"] if "classes" in p else p["dice"]
                for s in self.sites
                if name in s.classes
                for p in s.patients
            ] or [s.classes[name].get("dice", math.nan) for s in self.sites if name in s.classes]
            out[name] = {
                "dice_mean": nanmean(dice),
                "dice_sd": float(np.nanstd(dice)) if dice else math.nan,
            }
        return out

    def units(self, metric: str) -> str | None:
        """The sites' common units of ``metric`` ("hd95" or "assd"); "mixed" if they differ."""
        found = {getattr(s, f"{metric}_units") for s in self.sites}
        return found.pop() if len(found) == 1 else ("mixed" if found else None)

    @property
    def epsilon_max(self) -> float | None:
        """The largest per-site epsilon (never an average); None without DP."""
        return _largest(s.privacy.get("epsilon") for s in self.sites if s.privacy)

    @property
    def epsilon_run_max(self) -> float | None:
        """The largest per-site epsilon of this run's own releases (what its target bounds)."""
        return _largest(s.privacy.get("epsilon_run") for s in self.sites if s.privacy)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "dp": self.dp,
            "unit": self.unit,
            "target_epsilon": self.target_epsilon,
            "sites": [s.to_dict() for s in self.sites],
            "dice_mean": self.dice_mean,
            "dice_sd": self.dice_sd,
            "classes": self.classes,
            "hd95_units": self.units("hd95"),
            "assd_units": self.units("assd"),
            "epsilon_max": epsilon_json(self.epsilon_max),
            "epsilon_run_max": epsilon_json(self.epsilon_run_max),
            "history": self.history,
            "seconds_per_epoch": self.seconds_per_epoch,
            "seconds_per_round": self.seconds_per_round,
            "wall_seconds": self.wall_seconds,
            "compute": self.compute,
        }
        if self.federation is not None:
            out.update({k: self.federation[k] for k in FEDERATION_KEYS})
        out.update({k: v for k, v in self.provenance.items() if k in PROVENANCE_KEYS})
        if self.dp and self.unit == "slice":
            out["privacy_note"] = SLICE_UNIT_NOTE
        return out

    def write(self, path: Path) -> dict[str, Any]:
        """Write ``results.json`` atomically; return what was written."""
        out = self.to_dict()
        write_json(path, out)
        return out
