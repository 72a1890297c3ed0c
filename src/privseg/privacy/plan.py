"""The DP plan of one site: sigma, q, steps, C, delta, unit and accountant, decided once.

Training at a site (:class:`~privseg.privacy.engine.SitePrivacy`), the federated server's
planned steps and the attack's DP setting all take their numbers from here, so they cannot
drift apart (the attack once re-derived them and ignored ``privacy.unit``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from privseg.config import Config, PrivacyConfig
from privseg.core.errors import ConfigError, DataError, PrivacyBudgetExceeded

Release = tuple[float, float, int]
MIN_USEFUL_EPSILON = 0.05
"""A run is refused, before any step, when less than this is left of a site's lifetime budget."""
DELTA_MARGIN = 0.1
"""delta above DELTA_MARGIN / n (n privacy units) is warned about: not far below 1/n."""


def unit_ids(split: Any, unit: str) -> np.ndarray:
    """Privacy-unit id of each training slice: the slice itself, or its patient."""
    if unit == "patient":
        return np.asarray(split.patient, dtype=np.int64)
    return np.arange(len(split), dtype=np.int64)


def count_units(units: np.ndarray) -> int:
    return len(np.unique(units)) if len(units) else 0


def expected_batch_size(batch_size: int, n_units: int) -> int:
    """Records per batch: ``train.batch_size``, capped by the number of units at the site."""
    return max(1, min(batch_size, n_units))


def steps_per_epoch(n_units: int, batch_size: int) -> int:
    """Optimizer steps that visit each record once on average (Poisson or shuffled batches)."""
    return max(1, math.ceil(n_units / batch_size))


def planned_steps(cfg: Config, n_units: int = 0, *, federated: bool) -> int:
    """A site's steps in the whole run: rounds x local steps, ``train.steps``, or epochs over
    its units."""
    if federated:
        return cfg.federated.rounds * cfg.federated.local_steps
    if cfg.train.steps:
        return cfg.train.steps
    batch = expected_batch_size(cfg.train.batch_size, n_units)
    return cfg.train.epochs * steps_per_epoch(n_units, batch)


@dataclass(frozen=True)
class DPPlan:
    """One site's DP-SGD parameters for a whole run; noise calibrated once for all its steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    unit: str
    accountant: str
    n_units: int
    expected_batch_size: int
    target_epsilon: float | None  # what the noise was calibrated for (None: noise was given)
    budget_bound: bool = False  # the noise was raised to stay within privacy.budget_epsilon

    @classmethod
    def build(
        cls,
        cfg: PrivacyConfig,
        *,
        n_units: int,
        batch_size: int,
        steps: int,
        site: str = "",
        target_epsilon: float | None = None,
        run_history: Sequence[Release] = (),
        spent_histories: Sequence[Sequence[Release]] = (),
    ) -> DPPlan:
        """Validate and calibrate ``steps`` more steps of one site.

        ``target_epsilon`` overrides the config's noise source. The target is for this run
        alone: ``run_history`` (its releases before a resume) counts toward it. With
        ``privacy.budget_epsilon``, each of ``spent_histories`` (the release histories of the
        site's patients, this run's included) composed with the plan must stay within the
        budget: the noise is raised to what remains, and the run is refused before any step
        when less than :data:`MIN_USEFUL_EPSILON` remains for a patient.
        """
        where = f" for site {site!r}" if site else ""
        if n_units <= 0:
            raise DataError(f"site {site!r} has no training data: cannot train with DP-SGD")
        if not cfg.delta < 1.0 / n_units:
            raise ConfigError(
                f"privacy.delta = {cfg.delta:g} is invalid{where}: must be < 1/n = "
                f"{1.0 / n_units:.3g} with n = {n_units} privacy units ({cfg.unit}s); "
                "a delta that large allows leaking a whole record"
            )
        if cfg.delta > DELTA_MARGIN / n_units:
            warnings.warn(
                f"privacy.delta = {cfg.delta:g} is not far below 1/n = {1.0 / n_units:.3g}"
                f"{where} (n = {n_units} {cfg.unit}s): with probability about n*delta = "
                f"{n_units * cfg.delta:.2g} the guarantee may fail for some record; use delta "
                f"< {DELTA_MARGIN:g}/n",
                UserWarning,
                stacklevel=2,
            )
        batch = expected_batch_size(batch_size, n_units)
        if batch >= n_units:
            warnings.warn(
                f"train.batch_size = {batch_size} covers all {n_units} privacy units"
                f"{where}: sample rate q = 1, so epsilon gets no subsampling amplification",
                UserWarning,
                stacklevel=2,
            )
        if steps <= 0:
            raise ConfigError(f"planned steps = {steps} is invalid: must be > 0")
        sample_rate = batch / n_units
        given = cfg.noise_multiplier
        if target_epsilon is None:
            cfg.noise_source()  # refuses neither-nor
            target_epsilon = cfg.target_epsilon
        else:
            given = None  # an explicit target (the attack's) replaces the config's noise
        if given is not None and given <= 0:
            raise ConfigError(
                f"privacy.noise_multiplier = {given!r} is invalid with privacy.enabled: "
                "noise 0 gives no privacy (infinite epsilon)"
            )
        from privseg.privacy import accounting  # Opacus (1-2 s to import) only for DP runs

        sigma = given or 0.0
        if target_epsilon is not None:  # a cap on this run's epsilon: the larger noise wins
            sigma = max(
                sigma,
                accounting.calibrate_noise(
                    target_epsilon=float(target_epsilon),
                    delta=cfg.delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=cfg.accountant,
                    prior=run_history,
                ),
            )
        budget_bound = False
        if cfg.budget_epsilon is not None:
            for spent in spent_histories or [[]]:
                sigma, raised = _within_budget(
                    cfg, site, float(sigma), sample_rate, steps, list(spent)
                )
                budget_bound = budget_bound or raised
        return cls(
            noise_multiplier=float(sigma),
            sample_rate=sample_rate,
            steps=int(steps),
            max_grad_norm=cfg.max_grad_norm,
            delta=cfg.delta,
            unit=cfg.unit,
            accountant=cfg.accountant,
            n_units=n_units,
            expected_batch_size=batch,
            target_epsilon=target_epsilon,
            budget_bound=budget_bound,
        )

    @classmethod
    def for_split(
        cls,
        cfg: Config,
        split: Any,
        *,
        federated: bool,
        site: str = "",
        steps: int | None = None,
        target_epsilon: float | None = None,
        run_history: Sequence[Release] = (),
        spent_histories: Sequence[Sequence[Release]] = (),
    ) -> DPPlan:
        """The plan of a site training on ``split`` (steps from the run's schedule)."""
        n_units = count_units(unit_ids(split, cfg.privacy.unit))
        return cls.build(
            cfg.privacy,
            n_units=n_units,
            batch_size=cfg.train.batch_size,
            steps=steps if steps is not None else planned_steps(cfg, n_units, federated=federated),
            site=site,
            target_epsilon=target_epsilon,
            run_history=run_history,
            spent_histories=spent_histories,
        )

    def stated_epsilon(self) -> float:
        """The epsilon this plan is quoted at: its target, or (noise given) its own steps'."""
        return self.target_epsilon if self.target_epsilon is not None else self.epsilon()

    def epsilon(self) -> float:
        """Epsilon of this plan taken alone (all its steps)."""
        from privseg.privacy import accounting

        return accounting.epsilon(
            [(self.noise_multiplier, self.sample_rate, self.steps)],
            delta=self.delta,
            accountant=self.accountant,
        )


def _within_budget(
    cfg: PrivacyConfig,
    site: str,
    sigma: float,
    sample_rate: float,
    steps: int,
    spent: list[Release],
) -> tuple[float, bool]:
    """``sigma``, or the larger noise that keeps the site's lifetime epsilon within its budget;
    ``(sigma, raised)``. Raises PrivacyBudgetExceeded when nothing useful remains."""
    from privseg.privacy import accounting

    budget = float(cfg.budget_epsilon)  # type: ignore[arg-type]
    after = accounting.epsilon(
        [*spent, (sigma, sample_rate, steps)], delta=cfg.delta, accountant=cfg.accountant
    )
    if after <= budget:
        return sigma, False
    used = accounting.epsilon(spent, delta=cfg.delta, accountant=cfg.accountant)
    left = budget - used
    refusal = (
        f"site {site!r} refuses to train: it has spent epsilon {used:.4g} of its lifetime budget "
        f"{budget:g} (privacy.budget_epsilon, delta={cfg.delta:g}, {cfg.accountant}) and this "
        f"run asks for {steps} steps at sample rate {sample_rate:.4g} (epsilon {after:.4g} "
        "composed); see `privseg budget --data CACHE`"
    )
    if left < MIN_USEFUL_EPSILON:
        raise PrivacyBudgetExceeded(f"{refusal}; less than {MIN_USEFUL_EPSILON:g} remains")
    try:
        raised = accounting.calibrate_noise(
            target_epsilon=budget,
            delta=cfg.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=cfg.accountant,
            prior=spent,
        )
    except ConfigError as exc:
        raise PrivacyBudgetExceeded(f"{refusal}; {exc}") from exc
    warnings.warn(
        f"site {site!r}: noise raised from {sigma:.4g} to {raised:.4g} so that the lifetime "
        f"epsilon stays within privacy.budget_epsilon = {budget:g} ({used:.4g} spent before)",
        UserWarning,
        stacklevel=3,
    )
    return raised, True
