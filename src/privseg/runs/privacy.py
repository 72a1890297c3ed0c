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
from privseg.core.errors import PrivacyBudgetExceeded
from privseg.privacy import accounting, history
from privseg.privacy.budget import site_budgets
from privseg.privacy.plan import DPPlan
from privseg.privacy.stores import open_store
from privseg.training.trainer import training_patients

log = logging.getLogger(__name__)


def plan_grid(cfg: Config, cache: Any, settings: list[tuple[str, Config]]) -> dict[str, Any]:
    """Per site: epsilon its training patients have spent so far (the one who spent most), and
    after every DP setting of the grid that has still to run (``settings``: (key, config)
    pairs), each at its own target as if taken alone.

    Raises PrivacyBudgetExceeded, naming the site and the numbers, when the composition would
    pass a patient's budget (the smaller of ``privacy.budget_epsilon`` and the ledger's).
    """
    plans: dict[str, Any] = {}
    dp = [(key, c) for key, c in settings if c.privacy.enabled]
    plain = [key for key, c in settings if not c.privacy.enabled]
    p = cfg.privacy
    for site in cache.sites:
        patients = training_patients(cache, site)[site]
        rows = open_store(p.ledger_dir, patients).rows()
        held = history.budget_of(rows, patients)
        budgets = [b for b in (p.budget_epsilon, held and held.epsilon) if b is not None]
        budget = min(budgets) if budgets else None
        if plain and budget is not None and not p.allow_nonprivate:
            raise PrivacyBudgetExceeded(
                f"the study would release site {site!r}'s patients without DP ({', '.join(plain)}: "
                f"epsilon infinite) although they hold a lifetime budget of {budget:g}; run only "
                "the DP settings (study.settings), or set privacy.allow_nonprivate = true to "
                "spend their budget on them; nothing was run"
            )
        if not dp:
            continue
        split = cache.split(site, "train")
        planned = []
        for _, c in dp:
            plan = DPPlan.for_split(c, split, federated=True, site=site)
            planned.append((plan.noise_multiplier, plan.sample_rate, plan.steps))
        before = after = 0.0
        for spent, _, _ in history.by_history(rows, patients):
            before = max(before, accounting.epsilon(spent, delta=p.delta, accountant=p.accountant))
            after = max(
                after,
                accounting.epsilon([*spent, *planned], delta=p.delta, accountant=p.accountant),
            )
        plans[site] = {"spent": before, "planned_total": after, "budget_epsilon": budget}
        log.info(
            "study privacy plan: site %s has spent epsilon %.3f; after %s it will have %.3f "
            "(delta %g, %s, %s)",
            site,
            before,
            ", ".join(key for key, _ in dp),
            after,
            p.delta,
            p.accountant,
            "no budget set" if budget is None else f"lifetime budget {budget:g}",
        )
        if budget is not None and after > budget:
            raise PrivacyBudgetExceeded(
                f"the study would overspend site {site!r}: its patients have spent epsilon "
                f"{before:.4g} and the DP settings still to run ({', '.join(k for k, _ in dp)}) "
                f"compose to {after:.4g}, over their lifetime budget of {budget:g}; drop "
                "epsilons from study.epsilons or raise privacy.budget_epsilon (see `privseg "
                f"budget --data {cache.root}`); nothing was run"
            )
    return plans


def spent(cfg: Config, cache: Any) -> list[dict[str, Any]]:
    """What each site's patients have spent over everything recorded so far, releases without
    DP included (epsilon infinite): what ``privseg budget --data`` shows."""
    groups = {s: training_patients(cache, s)[s] for s in cache.sites}
    ledger = open_store(cfg.privacy.ledger_dir, [q for g in groups.values() for q in g])
    return site_budgets(ledger, groups, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
