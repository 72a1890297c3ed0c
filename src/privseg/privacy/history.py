"""Patients' release histories and budgets, read from verified ledger rows (pure functions).

A patient's epsilon composes every release whose ``patients`` include it; its budget is the
strictest (epsilon, delta) of every budget row that names it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from privseg.privacy import accounting

RELEASE_KEYS = (
    "kind",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "unit",
    "accountant",
    "delta",
    "time",
    "run_id",
    "site",
)
"""One release as ``privseg budget --format json`` and every results.json site entry show it."""


@dataclass(frozen=True)
class Budget:
    """A lifetime (epsilon, delta) budget: composition is always taken at this delta."""

    epsilon: float
    delta: float

    def tighter(self, other: Budget | None) -> Budget:
        if other is None:
            return self
        return Budget(min(self.epsilon, other.epsilon), min(self.delta, other.delta))


Group = tuple[tuple[tuple[float, float, int], ...], Budget | None, tuple[str, ...]]


def by_history(rows: list[dict[str, Any]], patients: list[str]) -> dict[Group, list[str]]:
    """``patients`` grouped by (their release history, their budget, their DP units): most
    sites' patients share one history, so the accountant runs once per group."""
    groups: dict[Group, list[str]] = {}
    for pid in patients:
        history, held, units = [], None, set()
        for r in rows:
            if pid not in r["patients"]:
                continue
            if r["kind"] == "budget":
                held = Budget(r["budget_epsilon"], r["delta"]).tighter(held)
                continue
            history.append((r["noise_multiplier"], r["sample_rate"], r["steps"]))
            if r["kind"] != "non-private":
                units.add(r["unit"])
        key = (tuple(history), held, tuple(sorted(units)))
        groups.setdefault(key, []).append(pid)
    return groups


def budget_of(rows: list[dict[str, Any]], patients: Iterable[str]) -> Budget | None:
    """The strictest budget held by any of ``patients`` (None: none set)."""
    found = None
    for _, held, _ in by_history(rows, sorted(set(patients))):
        found = held.tighter(found) if held is not None else found
    return found


def worst(
    rows: list[dict[str, Any]],
    patients: Iterable[str],
    *,
    delta: float | None,
    accountant: str,
    run_id: str | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """(epsilon, releases) of the patient who has spent most: every release that touched
    that patient (of ``run_id`` only, when given), so epsilon recomputes from the list.
    ``delta`` None: the patient's budget delta, else the smallest delta it was released at.
    """
    best: tuple[float, list[dict[str, Any]]] = (0.0, [])
    for pid in sorted(set(patients)):
        mine = [
            r
            for r in rows
            if pid in r["patients"]
            and r["kind"] != "budget"
            and (run_id is None or r["run_id"] == run_id)
        ]
        if not mine:
            continue
        held = budget_of(rows, [pid])
        at = delta or (held.delta if held is not None else min(r["delta"] for r in mine))
        eps = accounting.epsilon(
            [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in mine],
            delta=at,
            accountant=accountant,
        )
        if eps > best[0] or not best[1]:
            best = (eps, [{k: r[k] for k in RELEASE_KEYS} for r in mine])
    return best


def row_problem(
    row: dict[str, Any], *, kinds: Sequence[str], units: Sequence[str]
) -> tuple[str, str] | None:
    """(field, rule) that makes a stored row invalid, or None: an edited or damaged row must
    never be read as less privacy spent."""
    for field in ("noise_multiplier", "sample_rate", "delta"):
        value = row[field]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return field, "must be a number"
        if not math.isfinite(value):
            return field, "must be finite"
    if row["kind"] not in kinds:
        return "kind", f"must be one of {', '.join(kinds)}"
    if not isinstance(row["steps"], int) or row["steps"] < 0:
        return "steps", "must be a whole number >= 0"
    if row["noise_multiplier"] < 0 or not 0 < row["sample_rate"] <= 1:
        return "noise_multiplier", "noise must be >= 0 and the sample rate in (0, 1]"
    if not 0 < row["delta"] < 1:
        return "delta", "must be in (0, 1)"
    if row["unit"] not in units or row["accountant"] not in accounting.ACCOUNTANTS:
        return "unit", f"unit one of {units}, accountant one of {accounting.ACCOUNTANTS.names()}"
    try:
        if not isinstance(json.loads(row["patients"]), list):
            return "patients", "must be a JSON list"
    except (TypeError, json.JSONDecodeError):
        return "patients", "must be a JSON list"
    return None
