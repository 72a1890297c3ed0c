"""Refuse a release that would overspend a site's (epsilon, delta) budget."""

from __future__ import annotations

from privseg.errors import PrivacyBudgetExceeded
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
