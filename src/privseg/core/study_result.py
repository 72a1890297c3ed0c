"""A study's ``results.json`` (``privseg run``): every setting's run, the attacks and audits.

Written and read back here, typed; each run inside is a :class:`~privseg.core.results.RunResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privseg.core.fields import Fields, read_fields
from privseg.core.io import write_json
from privseg.core.results import SETTINGS, RunResult

STUDY_KEYS = (
    "preset",
    "quick",
    "privseg_version",
    "created",
    "machine",
    "data",
    "config",
    "wall_seconds",
    "runs",
    "attack",
    "audit",
    "threat_model",
    "privacy",
    "compute_rule",
)
COMPUTE_RULES = {
    "equal": (
        "Equal compute: every setting takes rounds x local_steps sequential optimiser steps and "
        "computes batch_size slice gradients per site and step (centralised: one pooled batch "
        "of sites x batch_size)."
    ),
    "as_configured": "Each setting's own schedule: compute differs between settings.",
}


@dataclass
class StudyRun:
    """One setting of a study's grid: its run's results and where it sits in the grid."""

    setting: str  # one of SETTINGS
    label: str  # as the report names it ("Federated + DP (ε=3)")
    run_dir: str
    result: RunResult

    @classmethod
    def from_fields(cls, f: Fields) -> StudyRun:
        return cls(
            setting=f.one_of("setting", SETTINGS),
            label=f.text("label"),
            run_dir=f.text("run_dir"),
            result=RunResult.from_fields(f),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.result.to_dict(),
            "setting": self.setting,
            "label": self.label,
            "run_dir": self.run_dir,
        }


@dataclass
class StudyResult:
    """A study's ``results.json`` (``privseg run``): every run, the attacks and audits.

    ``preset`` is "quick" for ``privseg run --quick`` (a smoke test: ``quick`` is true and the
    report draws no comparisons) and "full" otherwise.
    """

    preset: str
    privseg_version: str
    created: str
    machine: dict[str, Any]
    data: dict[str, Any]
    config: dict[str, Any]
    wall_seconds: float
    runs: list[StudyRun]
    attack: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    # per site: the grid's planned epsilon ("plan") and what the data spent ("spent": the
    # rows of `privseg budget --data`, every release included)
    privacy: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> StudyResult:
        """A study's ``results.json`` read back; a bad field is a DataError naming it."""
        f = read_fields(path)
        f.sub("config").sub("study").one_of("compute", tuple(COMPUTE_RULES))
        return cls(
            preset=f.text("preset"),
            privseg_version=f.text("privseg_version"),
            created=f.text("created"),
            machine=f.mapping("machine"),
            data=f.mapping("data"),
            config=f.mapping("config"),
            wall_seconds=f.metric("wall_seconds"),
            runs=[StudyRun.from_fields(r) for r in f.each("runs")],
            attack=[a.data for a in f.each("attack")],
            audit=[a.data for a in f.each("audit")],
            privacy=f.mapping("privacy"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "quick": self.preset == "quick",
            "privseg_version": self.privseg_version,
            "created": self.created,
            "machine": self.machine,
            "data": self.data,
            "config": self.config,
            "wall_seconds": self.wall_seconds,
            "runs": [r.to_dict() for r in self.runs],
            "attack": self.attack,
            "audit": self.audit,
            "threat_model": self.attack[0].get("threat_model", {}) if self.attack else {},
            "privacy": self.privacy,
            "compute_rule": COMPUTE_RULES[self.config["study"]["compute"]],
        }

    def write(self, path: Path) -> dict[str, Any]:
        out = self.to_dict()
        write_json(path, out)
        return out
