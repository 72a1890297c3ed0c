"""``SitePrivacy``: everything one site needs for DP-SGD, behind one object.

It samples Poisson batches of privacy units, computes the DP gradient, and reserves each
block of steps in the site's durable ledger *before* they run (budget checked first), so a
crash can only over-count the privacy spent. Epsilon is always recomputed from the ledger.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.config import PrivacyConfig
from privseg.privacy.budget import check_budget
from privseg.privacy.dp_sgd import DPGradient, LossFn, PoissonUnitSampler, secure_generator
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.plan import DPPlan
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
        ledger_path: Path,
        run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.site = site
        self.run_id = run_id or ""
        self.units = np.asarray(units)
        self.ledger = PrivacyLedger(ledger_path)
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
        """Check the budget, then durably record ``steps`` BEFORE they are run."""
        if steps <= 0:
            raise ValueError(f"steps = {steps} is invalid: must be > 0")
        planned = (self.noise_multiplier, self.sample_rate, int(steps))
        if self.cfg.budget_epsilon is not None:
            check_budget(
                self.ledger,
                site=self.site,
                planned=planned,
                budget_epsilon=self.cfg.budget_epsilon,
                delta=self.plan.delta,
                accountant=self.plan.accountant,
            )
        self.ledger.record(
            site=self.site,
            run_id=run_id if run_id is not None else self.run_id,
            unit=self.plan.unit,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=int(steps),
            accountant=self.plan.accountant,
            delta=self.plan.delta,
            note=f"n_units={self.plan.n_units} C={self.plan.max_grad_norm:g}",
        )

    # ---- reporting -----------------------------------------------------------------------
    def epsilon(self) -> float:
        """Cumulative epsilon of this site over every reserved release (all runs)."""
        return self.ledger.epsilon(
            delta=self.plan.delta, accountant=self.plan.accountant, site=self.site
        )

    def summary(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon(),
            "delta": self.plan.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.ledger.steps(self.site),
            "clip_norm": self.plan.max_grad_norm,
            "accountant": self.plan.accountant,
            "unit": self.plan.unit,
            "expected_batch_size": self.expected_batch_size,
        }
