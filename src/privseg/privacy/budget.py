"""What each site's data has spent: the rows ``privseg budget`` prints, from the ledgers.

Refusing a release that would overspend happens in the ledger itself
(:meth:`~privseg.privacy.ledger.PrivacyLedger.reserve`), in the same transaction as the insert.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from privseg.errors import ConfigError, DataError
from privseg.privacy import accounting
from privseg.privacy.ledger import PrivacyLedger, ledger_folder

LEDGER_SUFFIXES = (".sqlite", ".db")


def ledger_files(paths: list[Path]) -> list[Path]:
    """Ledger files named, or found in the folders named."""
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


def data_ledgers(cache: Path, ledger_dir: Path | None = None) -> list[Path]:
    """The ledgers of a prepared cache's sites (``<cache>.ledgers``, or ``ledger_dir``)."""
    folder = ledger_dir or ledger_folder(cache)
    if not folder.is_dir():
        raise DataError(
            f"no privacy ledger for {cache}: {folder} does not exist (no DP run has used this "
            "data yet, or its runs set privacy.ledger_dir: pass it with --ledgers)"
        )
    return ledger_files([folder])


def site_budgets(
    files: list[Path],
    *,
    delta: float | None = None,
    accountant: str | None = None,
    budget_epsilon: float | None = None,
) -> list[dict[str, Any]]:
    """Per (ledger, site): epsilon spent at ``delta`` (default: the largest delta the site's
    releases used) with ``accountant`` (default: the one they used), unit, lifetime budget
    (the smallest of ``budget_epsilon`` and the one the ledger holds), what remains, and
    every release (epsilon is recomputable from ``releases`` alone; None = unbounded)."""
    if delta is not None and not 0 < delta < 1:
        raise ConfigError(f"--delta = {delta!r} is invalid: allowed values are > 0 and < 1")
    if accountant is not None and accountant not in accounting.ACCOUNTANTS:
        raise ConfigError(f"--accountant = {accountant!r} is invalid: allowed 'prv', 'rdp'")
    out = []
    for file in ledger_files(files):
        ledger = PrivacyLedger(file)
        held = ledger.budget()
        for site in ledger.sites():
            releases = ledger.releases(site)
            d = delta if delta is not None else max(r["delta"] for r in releases)
            acc = accountant or releases[-1]["accountant"]
            eps = ledger.epsilon(delta=d, accountant=acc, site=site)
            budgets = [b for b in (budget_epsilon, held) if b is not None]
            budget = min(budgets) if budgets else None
            left = None if budget is None else budget - eps
            out.append(
                {
                    "name": site,
                    "ledger": str(file),
                    "epsilon": eps if math.isfinite(eps) else None,
                    "delta": d,
                    "unit": releases[-1]["unit"],
                    "accountant": acc,
                    "budget_epsilon": budget,
                    "remaining": left if left is None or math.isfinite(left) else None,
                    "steps": sum(r["steps"] for r in releases),
                    "releases": releases,
                }
            )
    return out
