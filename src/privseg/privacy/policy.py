"""A site's own privacy policy is a floor: merged field by field with the server's request,
only ever stricter, so no server (or config) can switch a site's DP off or weaken it."""

from __future__ import annotations

import dataclasses

from privseg.config import PrivacyConfig

UNIT_STRENGTH = {"slice": 0, "patient": 1}


def _least(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _most(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def apply_floor(requested: PrivacyConfig, own: PrivacyConfig) -> tuple[PrivacyConfig, list[str]]:
    """The privacy settings a site trains with, and what it changed in the request.

    DP is on if either side turns it on or the site sets a budget; delta, the lifetime budget
    and the target epsilon are the smaller of the two; the noise multiplier the larger (with
    both a noise and a target, the larger resulting noise wins: see ``DPPlan``); the unit the
    stronger; constant-shape steps if either side asks; the site's accountant and ledger
    folder always (a server cannot move a site's ledger); evaluation answers only as the site
    allows (no ``eval_noise`` of its own: it refuses; else the larger noise and the fewer
    queries); ``allow_nonprivate`` only its own. The site cannot tell its explicit values from
    defaults: its defaults (target 8, delta 1e-5, constant-shape steps on) are floors too.
    """
    wants_dp = own.enabled or requested.enabled or own.budget_epsilon is not None
    site_owned = {"ledger_dir": own.ledger_dir, "allow_nonprivate": own.allow_nonprivate}
    if not wants_dp:
        return dataclasses.replace(requested, **site_owned), []
    merged = dataclasses.replace(
        requested,
        enabled=True,
        noise_multiplier=_most(own.noise_multiplier, requested.noise_multiplier),
        target_epsilon=_least(own.target_epsilon, requested.target_epsilon),
        delta=min(own.delta, requested.delta),
        unit=max(own.unit, requested.unit, key=UNIT_STRENGTH.__getitem__),
        budget_epsilon=_least(own.budget_epsilon, requested.budget_epsilon),
        accountant=own.accountant,
        eval_noise=None if own.eval_noise is None else _most(own.eval_noise, requested.eval_noise),
        eval_queries=min(own.eval_queries, requested.eval_queries),
        constant_time=True if own.constant_time or requested.constant_time else own.constant_time,
        **site_owned,
    )
    changed = [
        f"privacy.{f.name}: {getattr(requested, f.name)!r} -> {getattr(merged, f.name)!r}"
        for f in dataclasses.fields(PrivacyConfig)
        if f.name not in site_owned and getattr(requested, f.name) != getattr(merged, f.name)
    ]
    merged.check()
    return merged, changed
