"""``SitePrivacy``: everything one site needs for DP-SGD, behind one object.

It samples Poisson batches of privacy units, computes the DP gradient, and reserves each
block of steps in the site's durable ledger *before* they run (budget checked first), so a
crash can only over-count the privacy spent. Epsilon is always recomputed from the ledger.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from privseg.config import Config, PrivacyConfig
from privseg.core.errors import PrivacyBudgetExceeded
from privseg.core.results import SLICE_UNIT_NOTE
from privseg.privacy import history
from privseg.privacy.dp_sgd import DPGradient
from privseg.privacy.history import Budget
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.padding import Batch, ConstantShapeBatches
from privseg.privacy.plan import DPPlan, unit_ids
from privseg.privacy.sampling import PoissonUnitSampler

log = logging.getLogger(__name__)


class SitePrivacy:
    """DP-SGD for one site: Poisson sampler, DP gradient, ledger and budget, all from one plan.

    ``patients`` maps each site whose data the training touches to its training patients'
    content fingerprints: one site, or every site for central training on pooled data. Each
    block of steps is one release on all of them in the ``ledger`` store.
    """

    def __init__(
        self,
        cfg: PrivacyConfig,
        plan: DPPlan,
        *,
        site: str,
        units: np.ndarray,
        ledger: PrivacyLedger,
        patients: Mapping[str, list[str]],
        run_id: str | None = None,
        prior_steps: int = 0,
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.prior_steps = prior_steps  # steps of this run recorded before (a resumed run)
        self.site = site
        self.run_id = run_id or ""
        self.units = np.asarray(units)
        self.ledger = ledger
        self.patients = {name: sorted(set(p)) for name, p in patients.items()}
        self.data_site = next(iter(self.patients))
        self.reserved = 0  # steps this run has reserved through this object
        self.sampler = PoissonUnitSampler(self.units, sample_rate=plan.sample_rate)
        # privacy.constant_time: every step computes on the same padded shape (padding.py)
        self.padding = (
            ConstantShapeBatches(
                self.units, sample_rate=plan.sample_rate, steps=plan.steps, rng=self.sampler.rng
            )
            if cfg.constant_time
            else None
        )
        self.gradient = DPGradient(
            max_grad_norm=plan.max_grad_norm,
            noise_multiplier=plan.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
            grad_path=cfg.grad_path,  # noise: an OS-seeded generator on the model's device
        )
        log.info(
            "DP-SGD site=%s unit=%s n=%d q=%.4g sigma=%.4g C=%g steps=%d delta=%g "
            "accountant=%s planned_epsilon=%.3f spent_so_far=%.3f budget=%s path=%s",
            site,
            plan.unit,
            plan.n_units,
            plan.sample_rate,
            plan.noise_multiplier,
            plan.max_grad_norm,
            plan.steps,
            plan.delta,
            plan.accountant,
            plan.epsilon(),
            self.epsilon(),
            "none-set" if cfg.budget_epsilon is None else f"{cfg.budget_epsilon:g}",
            cfg.grad_path,
        )
        if self.padding is not None:
            log.info(
                "DP-SGD site=%s constant-shape steps: %d unit slots x %d slices (expected "
                "batch %.3g units; a larger one, probability <= %g over the run, is computed "
                "in full and logged)",
                site,
                self.padding.units_cap,
                self.padding.unit_slices,
                plan.sample_rate * plan.n_units,
                self.padding.overflow,
            )
        if plan.unit == "slice":
            warnings.warn(SLICE_UNIT_NOTE, UserWarning, stacklevel=2)

    @property
    def noise_multiplier(self) -> float:
        return self.plan.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    @property
    def expected_batch_size(self) -> int:
        return self.plan.expected_batch_size

    # ---- training ------------------------------------------------------------------------
    def sample_batch(self) -> Batch:
        """``(idx, groups, real)`` of one Poisson batch: slice indices, unit group 0..k-1 per
        slice, and which slices are real. With ``privacy.constant_time`` padded to the same
        shape every step (dummy slices ``real = False``); without it unpadded (may be empty)."""
        idx, groups = self.sampler.sample()
        if self.padding is None:
            return Batch(idx, groups, np.ones(len(idx), dtype=bool))
        return self.padding.pad(idx, groups)

    def reserve(self, steps: int, *, run_id: str | None = None) -> None:
        """Durably record ``steps`` BEFORE they are run, unit and budget checked in the same
        ledger transaction. Refuses (PrivacyBudgetExceeded, nothing written) steps beyond what
        this run's noise was calibrated for: a server cannot stretch a site's run."""
        if steps <= 0:
            raise ValueError(f"steps = {steps} is invalid: must be > 0")
        if self.reserved + steps > self.plan.steps:
            raise PrivacyBudgetExceeded(
                f"site {self.site!r} refuses {steps} more steps: this run calibrated its noise "
                f"(sigma {self.noise_multiplier:.4g}) for {self.prior_steps + self.plan.steps} "
                f"steps and has run {self.prior_steps + self.reserved}; more rounds or local "
                "steps than planned would pass its target"
            )
        budget = self.cfg.budget_epsilon
        self.ledger.reserve(
            patients=[p for group in self.patients.values() for p in group],
            site=self.site,
            run_id=run_id if run_id is not None else self.run_id,
            unit=self.plan.unit,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=int(steps),
            accountant=self.plan.accountant,
            delta=self.plan.delta,
            budget=None if budget is None else Budget(budget, self.plan.delta),
            note=f"n_units={self.plan.n_units} C={self.plan.max_grad_norm:g}",
        )
        self.reserved += int(steps)

    @property
    def trained(self) -> bool:
        """Whether this run has trained on the site's patients (here or before a restart):
        only then may the site answer questions about the run's model."""
        return self.reserved + self.prior_steps > 0

    # ---- reporting -----------------------------------------------------------------------
    def epsilon(self, site: str | None = None) -> float:
        """Lifetime epsilon of a site's training patients (the one who has spent most) over
        every recorded release (all runs); of the worst site's when the training touches
        several."""
        names = [site] if site is not None else list(self.patients)
        return max(self._worst(n)[0] for n in names)

    def _worst(self, site: str, run_id: str | None = None) -> tuple[float, list[dict[str, Any]]]:
        return self.ledger.worst(
            self.released_on(site),
            delta=self.plan.delta,
            accountant=self.plan.accountant,
            run_id=run_id,
        )

    def released_on(self, site: str) -> list[str]:
        """Every patient of ``site`` this run released on: its training patients, and the
        patients its evaluation answers were recorded on (``gaussian`` rows of this run)."""
        asked = [
            r["patients"]
            for r in self.ledger.rows()
            if r["kind"] == "gaussian" and r["run_id"] == self.run_id and r["site"] == site
        ]
        return sorted(set(self.patients[site]).union(*asked))

    def run_epsilon(self) -> float:
        """Epsilon of this run's own releases, taken alone (what ``target_epsilon`` bounds)."""
        return max(self._worst(n, self.run_id)[0] for n in self.patients)

    def summary(self, site: str | None = None) -> dict[str, Any]:
        """The privacy fields of a results.json site entry (``site``'s patients; default the
        first): ``epsilon`` recomputes from ``releases`` alone (every release on the patient
        who has spent most, at ``delta``)."""
        name = site or self.data_site
        eps, releases = self._worst(name)
        held = self.ledger.budget(self.released_on(name))
        return {
            "epsilon": eps,
            "epsilon_run": self._worst(name, self.run_id)[0],
            "delta": self.plan.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.reserved,
            "steps_lifetime": sum(r["steps"] for r in releases),
            "max_grad_norm": self.plan.max_grad_norm,
            "accountant": self.plan.accountant,
            "unit": self.plan.unit,
            "budget_epsilon": None if held is None else held.epsilon,
            "budget_delta": None if held is None else held.delta,
            "expected_batch_size": self.expected_batch_size,
            "ledger": str(self.ledger.path),
            "releases": releases,
        }


def open_site_privacy(
    cfg: Config,
    train: Any,
    *,
    site: str,
    ledger: PrivacyLedger,
    patients: Mapping[str, list[str]],
    planned_steps: int,
    run_id: str,
) -> SitePrivacy:
    """The DP-SGD of one run on ``patients`` (``{data site: fingerprints}``) in the ledger
    store, calibrated once for the run.

    A resumed run (rows of ``run_id`` already recorded) calibrates only its remaining steps,
    its earlier releases counting toward ``target_epsilon``; every release on each patient
    counts toward that patient's budget (the patient who has spent most sets the noise). A
    run asking for a larger delta than a budget's is refused here, before any step.
    """
    everyone = [p for group in patients.values() for p in group]
    rows = ledger.rows()
    held = history.budget_of(rows, everyone)
    if held is not None:
        if cfg.privacy.delta > held.delta:
            raise PrivacyBudgetExceeded(
                f"site {site!r} refuses privacy.delta = {cfg.privacy.delta:g}: its patients hold "
                f"a lifetime budget of epsilon {held.epsilon:g} at delta {held.delta:g}, and a "
                f"larger delta would weaken it; set privacy.delta <= {held.delta:g}"
            )
        if (cfg.privacy.budget_epsilon or math.inf) > held.epsilon:
            # a run's config may lower a lifetime budget, never raise it
            cfg = cfg.replace(**{"privacy.budget_epsilon": held.epsilon})
    _, mine_rows = history.worst(
        rows, everyone, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant, run_id=run_id
    )
    mine = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in mine_rows]
    done = sum(n for _, _, n in mine)
    remaining = planned_steps - done
    units = unit_ids(train, cfg.privacy.unit)
    if remaining <= 0:  # every planned step is recorded: no more training, but the site can
        # still answer about the run's final model (a site restarted before the final test)
        sigma, q, _ = mine[-1]
        log.info("site %s: run %s already recorded its %d planned steps", site, run_id, done)
        n_units = len(np.unique(units))
        spent = DPPlan(
            noise_multiplier=sigma,
            sample_rate=q,
            steps=0,
            max_grad_norm=cfg.privacy.max_grad_norm,
            delta=cfg.privacy.delta,
            unit=cfg.privacy.unit,
            accountant=cfg.privacy.accountant,
            n_units=n_units,
            expected_batch_size=max(1, round(n_units * q)),
            target_epsilon=cfg.privacy.target_epsilon,
        )
        return SitePrivacy(
            cfg.privacy, spent, site=site, units=units, ledger=ledger, patients=patients,
            run_id=run_id, prior_steps=done,
        )  # fmt: skip
    spent = [list(past) for past, _, _ in history.by_history(rows, everyone)]
    plan = DPPlan.for_split(
        cfg,
        train,
        federated=False,
        site=site,
        steps=remaining,
        run_history=mine,
        spent_histories=spent,
    )
    return SitePrivacy(
        cfg.privacy,
        plan,
        site=site,
        units=units,
        ledger=ledger,
        patients=patients,
        run_id=run_id,
        prior_steps=done,
    )


def record_nonprivate(
    cfg: PrivacyConfig,
    ledger: PrivacyLedger,
    patients: Mapping[str, list[str]],
    *,
    site: str,
    steps: int,
    run_id: str,
    note: str = "trained without DP",
) -> None:
    """Record a release without DP on ``patients`` (a training run, by default): their
    epsilon becomes infinite.
    Refused (nothing written) when any of them holds a budget, unless the config says
    ``privacy.allow_nonprivate = true``."""
    try:
        ledger.reserve(
            patients=[p for group in patients.values() for p in group],
            site=site,
            run_id=run_id,
            kind="non-private",
            unit=cfg.unit,
            noise_multiplier=0.0,
            sample_rate=1.0,
            steps=max(1, int(steps)),
            accountant=cfg.accountant,
            delta=cfg.delta,
            over_budget=cfg.allow_nonprivate,
            note=note,
        )
    except PrivacyBudgetExceeded as exc:
        raise PrivacyBudgetExceeded(
            f"{exc}. Training without DP on patients under a budget is refused: train with DP "
            "(--dp), or set privacy.allow_nonprivate = true to train anyway and record it "
            "(their epsilon becomes infinite)"
        ) from exc
    log.warning(
        "site %s trains without DP: recorded in %s as a release with epsilon infinite on its "
        "%d patients",
        site,
        ledger.path,
        sum(len(g) for g in patients.values()),
    )
