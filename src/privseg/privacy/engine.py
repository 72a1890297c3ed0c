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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.config import Config, PrivacyConfig
from privseg.errors import PrivacyBudgetExceeded
from privseg.privacy import accounting
from privseg.privacy.dp_sgd import DPGradient, LossFn
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.padding import Batch, ConstantShapeBatches
from privseg.privacy.plan import DPPlan, unit_ids
from privseg.privacy.sampling import PoissonUnitSampler
from privseg.results import SLICE_UNIT_NOTE

log = logging.getLogger(__name__)


class SitePrivacy:
    """DP-SGD for one site: Poisson sampler, DP gradient, ledger and budget, all from one plan.

    ``ledgers`` maps each site whose data the training touches to that data's ledger: one for
    a site, every site's for central training on pooled data (each patient's release is
    recorded where that patient's data is accounted).
    """

    def __init__(
        self,
        cfg: PrivacyConfig,
        plan: DPPlan,
        *,
        site: str,
        units: np.ndarray,
        ledgers: Mapping[str, PrivacyLedger],
        run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.site = site
        self.run_id = run_id or ""
        self.units = np.asarray(units)
        self.ledgers = dict(ledgers)
        self.data_site, self.ledger = next(iter(self.ledgers.items()))
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
            cfg.budget_epsilon,
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

    def step_gradients(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: Any,
        real: Any = None,
    ) -> dict[str, float]:
        """Set ``p.grad`` to the clipped, noised, averaged gradient (call every sampled batch,
        empty ones included: they were reserved and are noise-only steps); ``real`` from
        :meth:`sample_batch` (None: every slice real)."""
        return self.gradient(model, loss_fn, images, labels, groups, real)

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
        for name, ledger in self.ledgers.items():  # central: each site's data, same release
            ledger.reserve(
                site=name,
                run_id=run_id if run_id is not None else self.run_id,
                unit=self.plan.unit,
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=int(steps),
                accountant=self.plan.accountant,
                delta=self.plan.delta,
                budget_epsilon=self.cfg.budget_epsilon,
                note=f"by {self.site} n_units={self.plan.n_units} C={self.plan.max_grad_norm:g}",
            )
        self.reserved += int(steps)

    # ---- reporting -----------------------------------------------------------------------
    def epsilon(self, site: str | None = None) -> float:
        """Cumulative epsilon of a site's data over every recorded release (all runs); of the
        worst site's when the training touches several."""
        names = [site] if site is not None else list(self.ledgers)
        return max(
            self.ledgers[n].epsilon(delta=self.plan.delta, accountant=self.plan.accountant, site=n)
            for n in names
        )

    def run_epsilon(self) -> float:
        """Epsilon of this run's own releases, taken alone (what ``target_epsilon`` bounds)."""
        history = self.ledger.history(self.data_site, run_id=self.run_id)
        return accounting.epsilon(history, delta=self.plan.delta, accountant=self.plan.accountant)

    def summary(self, site: str | None = None) -> dict[str, Any]:
        """The privacy fields of a results.json site entry (``site``'s data; default the
        first): the total epsilon is recomputable from ``releases`` (every release ever
        recorded on that data) alone."""
        name = site or self.data_site
        ledger = self.ledgers[name]
        return {
            "epsilon": self.epsilon(name),
            "epsilon_run": self.run_epsilon(),
            "delta": self.plan.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": ledger.steps(name),
            "clip_norm": self.plan.max_grad_norm,
            "accountant": self.plan.accountant,
            "unit": self.plan.unit,
            "budget_epsilon": self.cfg.budget_epsilon,
            "expected_batch_size": self.expected_batch_size,
            "ledger": str(ledger.path),
            "releases": ledger.releases(name),
        }


def open_site_privacy(
    cfg: Config,
    train: Any,
    *,
    site: str,
    ledgers: Mapping[str, tuple[Path, str]],
    planned_steps: int,
    run_id: str,
) -> SitePrivacy:
    """The DP-SGD of one run on its data's ledgers (``{data site: (path, data key)}``),
    calibrated once for the run.

    A resumed run (rows of ``run_id`` already recorded) calibrates only its remaining steps,
    its earlier releases counting toward ``target_epsilon``; every release on each site's data
    counts toward that site's ``budget_epsilon`` (the strictest site sets the noise).
    """
    opened: dict[str, PrivacyLedger] = {}
    for name, (path, key) in ledgers.items():
        opened[name] = PrivacyLedger(path)
        opened[name].bind(key, name)
    held = [b for b in (led.budget() for led in opened.values()) if b is not None]
    if held and (cfg.privacy.budget_epsilon or math.inf) > min(held):
        # a run's config may lower a site's lifetime budget, never raise it
        cfg = cfg.replace(**{"privacy.budget_epsilon": min(held)})
    first, ledger = next(iter(opened.items()))
    mine = ledger.history(first, run_id=run_id)
    remaining = planned_steps - sum(n for _, _, n in mine)
    if remaining <= 0:
        raise PrivacyBudgetExceeded(
            f"site {site!r} refuses: run {run_id} already recorded its {planned_steps} planned "
            f"steps in {ledger.path}"
        )
    plans = [
        DPPlan.for_split(
            cfg,
            train,
            federated=False,
            site=name,
            steps=remaining,
            run_history=mine,
            spent_history=led.history(name),
        )
        for name, led in opened.items()
    ]
    return SitePrivacy(
        cfg.privacy,
        max(plans, key=lambda p: p.noise_multiplier),
        site=site,
        units=unit_ids(train, cfg.privacy.unit),
        ledgers=opened,
        run_id=run_id,
    )
