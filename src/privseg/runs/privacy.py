"""A study's privacy, site by site: its whole grid planned before it starts, and what it spent.

Every DP setting of ``privseg run`` trains on the same patients, so their releases compose in
each site's ledger (epsilon 1, 3 and 8 compose to 8.97 on a small phantom with PRV, not 8; the
plain sum 12 bounds it). The plan refuses a grid
whose composition would pass a site's lifetime budget before any setting runs.
"""

from __future__ import annotations

import logging
from typing import Any

from privseg.config import Config
from privseg.errors import PrivacyBudgetExceeded
from privseg.privacy import accounting
from privseg.privacy.budget import site_budgets
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.plan import DPPlan
from privseg.training.trainer import site_ledger

log = logging.getLogger(__name__)


def plan_grid(cfg: Config, cache: Any, settings: list[tuple[str, Config]]) -> dict[str, Any]:
    """Per site: epsilon spent so far, and after every DP setting of the grid that has still to
    run (``settings``: (key, config) pairs), each at its own target as if taken alone.

    Raises PrivacyBudgetExceeded, naming the site and the numbers, when the composition would
    pass the site's budget (the smaller of ``privacy.budget_epsilon`` and its ledger's).
    """
    plans: dict[str, Any] = {}
    dp = [(key, c) for key, c in settings if c.privacy.enabled]
    if not dp:
        return plans
    p = cfg.privacy
    for site in cache.sites:
        path, _ = site_ledger(cfg, cache, site)
        ledger = PrivacyLedger(path) if path.is_file() else None
        spent = ledger.history(site) if ledger is not None else []
        held = ledger.budget() if ledger is not None else None
        budgets = [b for b in (p.budget_epsilon, held) if b is not None]
        budget = min(budgets) if budgets else None
        split = cache.split(site, "train")
        planned = []
        for _, c in dp:
            plan = DPPlan.for_split(c, split, federated=True, site=site)
            planned.append((plan.noise_multiplier, plan.sample_rate, plan.steps))
        before = accounting.epsilon(spent, delta=p.delta, accountant=p.accountant)
        after = accounting.epsilon([*spent, *planned], delta=p.delta, accountant=p.accountant)
        plans[site] = {"spent": before, "planned_total": after, "budget_epsilon": budget}
        log.info(
            "study privacy plan: site %s has spent epsilon %.3f; after %s it will have %.3f "
            "(delta %g, %s, budget %s)",
            site,
            before,
            ", ".join(key for key, _ in dp),
            after,
            p.delta,
            p.accountant,
            budget,
        )
        if budget is not None and after > budget:
            raise PrivacyBudgetExceeded(
                f"the study would overspend site {site!r}: it has spent epsilon {before:.4g} and "
                f"the DP settings still to run ({', '.join(key for key, _ in dp)}) compose to "
                f"{after:.4g}, over its lifetime budget of {budget:g}; drop epsilons from "
                "study.epsilons or raise privacy.budget_epsilon (see `privseg budget --data "
                f"{cache.root}`); nothing was run"
            )
    return plans


def spent(cfg: Config, cache: Any) -> list[dict[str, Any]]:
    """What each site's data has spent over everything recorded so far (``privseg budget``)."""
    files = [p for p, _ in (site_ledger(cfg, cache, s) for s in cache.sites) if p.is_file()]
    if not files:
        return []
    return site_budgets(files, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
