"""Reading a study's runs: labels, order, which learned, epsilon, baselines.

Plain functions over the ``results.json`` dictionaries, shared by the tables and the summary
so both say the same about each run.
"""

from __future__ import annotations

import math
from typing import Any

from privseg.core.results import FEDERATED, LOCAL, SETTINGS
from privseg.report.format import is_num

DID_NOT_LEARN_DICE = 0.1
"""A setting whose mean test Dice is below this did not learn: reported so, never compared."""


def run_label(run: dict[str, Any]) -> str:
    return str(run.get("label") or run.get("setting") or run.get("mode") or "run")


def sorted_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs in the paper's order (central, local, federated, DP by increasing epsilon)."""

    def key(r: dict[str, Any]) -> tuple[int, float]:
        s = r.get("setting")
        rank = SETTINGS.index(s) if s in SETTINGS else len(SETTINGS)
        return rank, run_epsilon(r) if is_num(run_epsilon(r)) else math.inf

    return sorted(runs, key=key)


def learned(run: dict[str, Any]) -> bool | None:
    """False when the run's mean test Dice is below :data:`DID_NOT_LEARN_DICE`; None unknown."""
    dice = run.get("dice_mean")
    return dice >= DID_NOT_LEARN_DICE if is_num(dice) else None


def with_verdict(label: str, did_not_learn: bool) -> str:
    """A run's label, marked when it did not learn (tables and the summary say the same)."""
    return f"{label} (did not learn)" if did_not_learn else label


def not_learned_label(run: dict[str, Any]) -> str:
    return with_verdict(run_label(run), learned(run) is False)


def run_epsilon(run: dict[str, Any]) -> float | None:
    """Epsilon actually spent by a DP run taken alone (the worst site), else its target."""
    for k in ("epsilon_run_max", "epsilon_max", "target_epsilon"):
        if is_num(run.get(k)):
            return float(run[k])
    return None


def site_names(runs: list[dict[str, Any]]) -> list[str]:
    """Every site seen in any run, in first-seen order."""
    names: list[str] = []
    for r in runs:
        for s in r.get("sites") or []:
            if s.get("name") not in names:
                names.append(s.get("name"))
    return names


def time_per_unit(run: dict[str, Any]) -> tuple[float | None, str]:
    """(seconds, "round"|"epoch") for a run: federated runs by round, others by epoch."""
    for key, unit in (("seconds_per_round", "round"), ("seconds_per_epoch", "epoch")):
        if is_num(run.get(key)):
            return float(run[key]), unit
    return None, "round" if run.get("mode") == FEDERATED else "epoch"


def baseline_for(run: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The non-private run of the same mode: what a DP run's cost is measured against."""
    for r in runs:
        if not r.get("dp") and r.get("mode") == run.get("mode"):
            return r
    return None


def federated_beats_local_cross_site(runs: list[dict[str, Any]]) -> bool | None:
    """Is non-private federated Dice above every other site's local-only model, site by site?"""
    local = next((r for r in runs if r.get("mode") == LOCAL and not r.get("dp")), None)
    fed = next((r for r in runs if r.get("mode") == FEDERATED and not r.get("dp")), None)
    if not local or not fed:
        return None
    best: dict[str, float] = {}
    for s in local.get("sites") or []:
        for other, dice in (s.get("cross") or {}).items():
            if is_num(dice):
                best[other] = max(best.get(other, -math.inf), dice)
    fed_dice = {s.get("name"): s.get("dice") for s in fed.get("sites") or []}
    if not best or not all(is_num(fed_dice.get(n)) for n in best):
        return None
    return all(fed_dice[n] > d for n, d in best.items())
