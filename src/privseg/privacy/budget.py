"""What patients have spent: the rows ``privseg budget`` prints and a study reports.

Patients are grouped by site (as their data names them), and each group shows its patient who
has spent most, recomputed from the ledger store. Refusing a release that would overspend
happens in the ledger itself (:meth:`~privseg.privacy.ledger.PrivacyLedger.reserve`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from privseg.core.errors import ConfigError
from privseg.core.registry import choice_error
from privseg.core.results import epsilon_json
from privseg.privacy import accounting, history
from privseg.privacy.ledger import PrivacyLedger


def recorded_sites(ledger: PrivacyLedger) -> dict[str, list[str]]:
    """Site name -> the patients of every release recorded under that name (central runs
    under ``central``)."""
    groups: dict[str, set[str]] = {}
    for row in ledger.rows():
        groups.setdefault(row["site"], set()).update(row["patients"])
    return {site: sorted(p) for site, p in sorted(groups.items())}


def site_budgets(
    ledger: PrivacyLedger,
    groups: Mapping[str, list[str]],
    *,
    delta: float | None = None,
    accountant: str | None = None,
) -> list[dict[str, Any]]:
    """Per group of patients (a site): epsilon of its patient who has spent most, at ``delta``
    (default: that patient's budget delta, else the smallest delta it was released at), with
    ``accountant`` (default: the one its last release used); its budget (epsilon, delta), what
    remains, and every release on that patient (epsilon recomputes from ``releases``)."""
    if delta is not None and not 0 < delta < 1:
        raise ConfigError(f"--delta = {delta!r} is invalid: allowed values are > 0 and < 1")
    if accountant is not None and accountant not in accounting.ACCOUNTANTS:
        raise choice_error("--accountant", accountant, accounting.ACCOUNTANTS.names())
    rows = ledger.rows()
    out = []
    for name, patients in groups.items():
        touched = [r for r in rows if r["kind"] != "budget" and r["patients"] & set(patients)]
        if not touched:
            continue
        acc = accountant or touched[-1]["accountant"]
        eps, releases = history.worst(rows, patients, delta=delta, accountant=acc)
        held = history.budget_of(rows, patients)
        at = delta or (held.delta if held is not None else min(r["delta"] for r in releases))
        left = None if held is None else held.epsilon - eps
        dp_units = [r["unit"] for r in releases if r["kind"] != "non-private"]
        out.append(
            {
                "name": name,
                "ledger": str(ledger.path),
                "patients": len(set(patients)),
                "epsilon": epsilon_json(eps),
                "delta": at,
                "unit": dp_units[-1] if dp_units else None,
                "accountant": acc,
                "budget_epsilon": None if held is None else held.epsilon,
                "budget_delta": None if held is None else held.delta,
                "remaining": None if left is None else epsilon_json(left),
                "steps": sum(r["steps"] for r in releases),
                "releases": releases,
            }
        )
    return out
