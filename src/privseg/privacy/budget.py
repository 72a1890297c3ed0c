"""A site's budget: refuse a release that would overspend it; what each ledger has spent."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from privseg.errors import ConfigError, DataError, PrivacyBudgetExceeded
from privseg.privacy import accounting
from privseg.privacy.ledger import PrivacyLedger


def check_budget(
    ledger: PrivacyLedger,
    *,
    site: str,
    planned: tuple[float, float, int],
    budget_epsilon: float,
    delta: float,
    accountant: str,
) -> float:
    """Epsilon after ``planned`` = (noise_multiplier, sample_rate, steps) on top of the
    site's recorded releases; raise :class:`PrivacyBudgetExceeded` if it exceeds the budget."""
    history = ledger.history(site)
    spent = accounting.epsilon(history, delta=delta, accountant=accountant)
    after = accounting.epsilon([*history, planned], delta=delta, accountant=accountant)
    if after > budget_epsilon:
        sigma, q, steps = planned
        raise PrivacyBudgetExceeded(
            f"site {site!r} refuses to train: it has spent epsilon {spent:.4g} (delta={delta:g}, "
            f"{accountant}) and the planned {steps} steps (noise {sigma:.4g}, sample rate "
            f"{q:.4g}) would bring it to {after:.4g}, over its budget of {budget_epsilon:g} "
            f"(ledger {ledger.path})"
        )
    return after


LEDGER_SUFFIXES = (".sqlite", ".db")


def ledger_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in LEDGER_SUFFIXES)
            if not found:
                raise DataError(f"folder {path} holds no ledger (*.sqlite or *.db)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"privacy ledger {path} does not exist")
    return files


def budget_rows(
    paths: list[Path], *, delta: float, accountant: str, budget_epsilon: float | None
) -> list[dict[str, Any]]:
    """One row per (ledger, site): releases, steps, epsilon spent, budget and what is left."""
    if not 0 < delta < 1:
        raise ConfigError(f"--delta = {delta!r} is invalid: allowed values are > 0 and < 1")
    if accountant not in ("prv", "rdp"):
        raise ConfigError(f"--accountant = {accountant!r} is invalid: allowed 'prv', 'rdp'")
    rows = []
    for file in ledger_files(paths):
        ledger = PrivacyLedger(file)
        for site in ledger.sites():
            entries = ledger.entries(site)
            eps = ledger.epsilon(delta=delta, accountant=accountant, site=site)
            left = None if budget_epsilon is None else budget_epsilon - eps
            rows.append(
                {
                    "ledger": str(file),
                    "site": site,
                    "releases": len(entries),
                    "steps": sum(e["steps"] for e in entries),
                    "epsilon": eps if math.isfinite(eps) else None,
                    "budget": budget_epsilon,
                    "left": left if left is None or math.isfinite(left) else None,
                    "delta": delta,
                    "accountant": accountant,
                }
            )
    return rows
