"""``SitePrivacy``: everything one site needs for DP-SGD, behind one object.

It samples Poisson batches of privacy units, computes the DP gradient, and reserves each
block of steps in the site's durable ledger *before* they run (budget checked first), so a
crash can only over-count the privacy spent. Epsilon is always recomputed from the ledger.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.config import Config, PrivacyConfig
from privseg.errors import PrivacyBudgetExceeded
from privseg.privacy import accounting
from privseg.privacy.dp_sgd import DPGradient, LossFn, PoissonUnitSampler, secure_generator
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.plan import DPPlan, unit_ids
from privseg.results import SLICE_UNIT_NOTE

log = logging.getLogger(__name__)


class SitePrivacy:
    """DP-SGD for one site: Poisson sampler, DP gradient, ledger and budget, all from one plan."""

    def __init__(
        self,
        cfg: PrivacyConfig,
        plan: DPPlan,
        *,
        site: str,
        units: np.ndarray,
        ledger: PrivacyLedger,
        run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.site = site
        self.run_id = run_id or ""
        self.units = np.asarray(units)
        self.ledger = ledger
        self.reserved = 0  # steps this run has reserved through this object
        self.sampler = PoissonUnitSampler(self.units, sample_rate=plan.sample_rate)
        self.gradient = DPGradient(
            max_grad_norm=plan.max_grad_norm,
            noise_multiplier=plan.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
            grad_path=cfg.grad_path,
            generator=secure_generator(),
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
            cfg.budget_epsilon,
            cfg.grad_path,
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

    @property
    def planned_steps(self) -> int:
        return self.plan.steps

    # ---- training ------------------------------------------------------------------------
    def sample_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(slice indices, unit group 0..k-1 per slice) of one Poisson batch; may be empty."""
        return self.sampler.sample()

    def step_gradients(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: Any,
    ) -> dict[str, float]:
        """Set ``p.grad`` to the clipped, noised, averaged gradient (call every sampled batch,
        empty ones included: they were reserved and are noise-only steps)."""
        return self.gradient(model, loss_fn, images, labels, groups)

    def reserve(self, steps: int, *, run_id: str | None = None) -> None:
        """Durably record ``steps`` BEFORE they are run, unit and budget checked in the same
        ledger transaction. Refuses (PrivacyBudgetExceeded, nothing written) steps beyond what
        this run's noise was calibrated for: a server cannot stretch a site's run."""
        if steps <= 0:
            raise ValueError(f"steps = {steps} is invalid: must be > 0")
        if self.reserved + steps > self.plan.steps:
            raise PrivacyBudgetExceeded(
                f"site {self.site!r} refuses {steps} more steps: this run calibrated its noise "
                f"(sigma {self.noise_multiplier:.4g}) for {self.plan.steps} steps and has run "
                f"{self.reserved}; more rounds or local steps than planned would pass its target"
            )
        self.ledger.reserve(
            site=self.site,
            run_id=run_id if run_id is not None else self.run_id,
            unit=self.plan.unit,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=int(steps),
            accountant=self.plan.accountant,
            delta=self.plan.delta,
            budget_epsilon=self.cfg.budget_epsilon,
            note=f"n_units={self.plan.n_units} C={self.plan.max_grad_norm:g}",
        )
        self.reserved += int(steps)

    # ---- reporting -----------------------------------------------------------------------
    def epsilon(self) -> float:
        """Cumulative epsilon of this site's data over every recorded release (all runs)."""
        return self.ledger.epsilon(
            delta=self.plan.delta, accountant=self.plan.accountant, site=self.site
        )

    def run_epsilon(self) -> float:
        """Epsilon of this run's own releases, taken alone (what ``target_epsilon`` bounds)."""
        history = self.ledger.history(self.site, run_id=self.run_id)
        return accounting.epsilon(history, delta=self.plan.delta, accountant=self.plan.accountant)

    def summary(self) -> dict[str, Any]:
        """The privacy fields of a results.json site entry: the total epsilon is recomputable
        from ``releases`` (every release ever recorded on this site's data) alone."""
        return {
            "epsilon": self.epsilon(),
            "epsilon_run": self.run_epsilon(),
            "delta": self.plan.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.ledger.steps(self.site),
            "clip_norm": self.plan.max_grad_norm,
            "accountant": self.plan.accountant,
            "unit": self.plan.unit,
            "budget_epsilon": self.cfg.budget_epsilon,
            "expected_batch_size": self.expected_batch_size,
            "ledger": str(self.ledger.path),
            "releases": self.ledger.releases(self.site),
        }


def open_site_privacy(
    cfg: Config,
    train: Any,
    *,
    site: str,
    ledger_path: Path,
    data_key: str,
    planned_steps: int,
    run_id: str,
) -> SitePrivacy:
    """The site's DP-SGD for one run on its data's ledger, calibrated once for the run.

    A resumed run (rows of ``run_id`` already in the ledger) calibrates only its remaining
    steps, with its earlier releases counting toward ``target_epsilon``; every release on the
    data counts toward ``budget_epsilon``.
    """
    ledger = PrivacyLedger(ledger_path)
    ledger.bind(data_key, site)
    held = ledger.budget()  # a run's config may lower the site's lifetime budget, never raise it
    if held is not None and (cfg.privacy.budget_epsilon or math.inf) > held:
        cfg = cfg.replace(**{"privacy.budget_epsilon": held})
    spent = ledger.history(site)
    mine = ledger.history(site, run_id=run_id)
    remaining = planned_steps - sum(n for _, _, n in mine)
    if remaining <= 0:
        raise PrivacyBudgetExceeded(
            f"site {site!r} refuses: run {run_id} already recorded its {planned_steps} planned "
            f"steps in {ledger.path}"
        )
    plan = DPPlan.for_split(
        cfg,
        train,
        federated=False,
        site=site,
        steps=remaining,
        run_history=mine,
        spent_history=spent,
    )
    return SitePrivacy(
        cfg.privacy,
        plan,
        site=site,
        units=unit_ids(train, cfg.privacy.unit),
        ledger=ledger,
        run_id=run_id,
    )
