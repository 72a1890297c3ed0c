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
from privseg.errors import ConfigError, DataError
from privseg.privacy import accounting
from privseg.privacy.budget import check_budget
from privseg.privacy.dp_sgd import DPGradient, LossFn, PoissonUnitSampler, secure_generator
from privseg.privacy.ledger import PrivacyLedger

log = logging.getLogger(__name__)

SLICE_UNIT_WARNING = (
    "privacy.unit = 'slice': epsilon bounds what leaks about one slice, not about a whole "
    "patient, whose many correlated slices each count separately; use privacy.unit = 'patient' "
    "for patient-level DP"
)


class SitePrivacy:
    """DP-SGD for one site: Poisson sampler, DP gradient, ledger and budget."""

    def __init__(
        self,
        cfg: PrivacyConfig,
        *,
        site: str,
        units: np.ndarray,
        expected_batch_size: int,
        planned_steps: int,
        ledger_path: Path,
        run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.site = site
        self.run_id = run_id or ""
        self.units = np.asarray(units)
        n_units = len(np.unique(self.units)) if self.units.size else 0
        if n_units == 0:
            raise DataError(f"site {site!r} has no training data: cannot train with DP-SGD")
        if not cfg.delta < 1.0 / n_units:
            raise ConfigError(
                f"privacy.delta = {cfg.delta:g} is invalid for site {site!r}: must be < 1/n = "
                f"{1.0 / n_units:.3g} with n = {n_units} privacy units ({cfg.unit}s); "
                "a delta that large allows leaking a whole record"
            )
        if not 0 < expected_batch_size <= n_units:
            raise ConfigError(
                f"expected batch size {expected_batch_size} is invalid for site {site!r}: must be "
                f"between 1 and the number of privacy units ({n_units} {cfg.unit}s); lower "
                "train.batch_size"
            )
        if planned_steps <= 0:
            raise ConfigError(f"planned steps = {planned_steps} is invalid: must be > 0")
        self.n_units = n_units
        self.expected_batch_size = int(expected_batch_size)
        self.sample_rate = expected_batch_size / n_units
        self.planned_steps = int(planned_steps)
        if cfg.noise_multiplier is not None:
            if cfg.noise_multiplier <= 0:
                raise ConfigError(
                    f"privacy.noise_multiplier = {cfg.noise_multiplier!r} is invalid with "
                    "privacy.enabled: noise 0 gives no privacy (infinite epsilon)"
                )
            self.noise_multiplier = float(cfg.noise_multiplier)
        else:
            if cfg.target_epsilon is None:
                raise ConfigError(
                    "privacy.noise_multiplier and privacy.target_epsilon are both unset: set one"
                )
            # Calibrated once for the whole planned run (all rounds), never per round.
            self.noise_multiplier = accounting.calibrate_noise(
                target_epsilon=cfg.target_epsilon,
                delta=cfg.delta,
                sample_rate=self.sample_rate,
                steps=self.planned_steps,
                accountant=cfg.accountant,
            )
        self.ledger = PrivacyLedger(ledger_path)
        self.sampler = PoissonUnitSampler(self.units, sample_rate=self.sample_rate)
        self.gradient = DPGradient(
            max_grad_norm=cfg.max_grad_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            grad_path=cfg.grad_path,
            generator=secure_generator(),
        )
        planned_eps = accounting.epsilon(
            [(self.noise_multiplier, self.sample_rate, self.planned_steps)],
            delta=cfg.delta,
            accountant=cfg.accountant,
        )
        log.info(
            "DP-SGD site=%s unit=%s n=%d q=%.4g sigma=%.4g C=%g steps=%d delta=%g "
            "accountant=%s planned_epsilon=%.3f spent_so_far=%.3f budget=%s path=%s",
            site,
            cfg.unit,
            n_units,
            self.sample_rate,
            self.noise_multiplier,
            cfg.max_grad_norm,
            self.planned_steps,
            cfg.delta,
            cfg.accountant,
            planned_eps,
            self.epsilon(),
            cfg.budget_epsilon,
            cfg.grad_path,
        )
        if cfg.unit == "slice":
            warnings.warn(SLICE_UNIT_WARNING, UserWarning, stacklevel=2)

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
                delta=self.cfg.delta,
                accountant=self.cfg.accountant,
            )
        self.ledger.record(
            site=self.site,
            run_id=run_id if run_id is not None else self.run_id,
            unit=self.cfg.unit,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=int(steps),
            accountant=self.cfg.accountant,
            delta=self.cfg.delta,
            note=f"n_units={self.n_units} C={self.cfg.max_grad_norm:g}",
        )

    # ---- reporting -----------------------------------------------------------------------
    def epsilon(self) -> float:
        """Cumulative epsilon of this site over every reserved release (all runs)."""
        return self.ledger.epsilon(
            delta=self.cfg.delta, accountant=self.cfg.accountant, site=self.site
        )

    def summary(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon(),
            "delta": self.cfg.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.ledger.steps(self.site),
            "clip_norm": self.cfg.max_grad_norm,
            "accountant": self.cfg.accountant,
            "unit": self.cfg.unit,
            "expected_batch_size": self.expected_batch_size,
        }
