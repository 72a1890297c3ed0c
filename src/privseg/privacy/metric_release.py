"""A DP site's answer to an evaluation query: the Gaussian mechanism on the sum of per-patient
Dice scores, recorded in the ledger store on the evaluated patients before it leaves."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from privseg.config import PrivacyConfig
from privseg.privacy.history import Budget
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.sampling import secure_generator

log = logging.getLogger(__name__)


def release_metrics(
    cfg: PrivacyConfig,
    ledger: PrivacyLedger,
    result: Mapping[str, Any],
    patients: list[str],
    *,
    site: str,
    run_id: str,
    classes: list[str],
    unit: str,
) -> dict[str, float] | None:
    """A DP site's answer to an evaluation query: the mean Dice (and each class's) of
    ``result``'s patients through the Gaussian mechanism, recorded on those patients first; or
    None (refused: ``privacy.eval_noise`` unset, or this run's ``privacy.eval_queries`` spent).

    Each patient's Dice lies in [0, 1], so adding or removing one patient moves the vector of
    sums (overall, then per class) by at most sqrt(1 + classes) in L2: noise of standard
    deviation ``eval_noise`` times that is one Gaussian step (q = 1) at noise multiplier
    ``eval_noise``. The patient count is public (as the sample rate makes it for training).
    """
    if cfg.eval_noise is None or not patients:
        return None
    asked = sum(
        1
        for r in ledger.rows()
        if r["kind"] == "gaussian" and r["run_id"] == run_id and r["site"] == site
    )
    if asked >= cfg.eval_queries:
        log.warning(
            "site %s refuses an evaluation query: run %s has had its %d (privacy.eval_queries)",
            site,
            run_id,
            cfg.eval_queries,
        )
        return None
    ledger.reserve(
        patients=patients,
        site=site,
        run_id=run_id,
        kind="gaussian",
        unit=unit,
        noise_multiplier=cfg.eval_noise,
        sample_rate=1.0,
        steps=1,
        accountant=cfg.accountant,
        delta=cfg.delta,
        budget=None if cfg.budget_epsilon is None else Budget(cfg.budget_epsilon, cfg.delta),
        note=f"evaluation query: mean Dice of {len(patients)} patients",
    )
    rows = [_clipped_dice(p, classes) for p in result.get("patients", [])]
    sums = np.sum(rows, axis=0) if rows else np.zeros(1 + len(classes))
    scale = cfg.eval_noise * math.sqrt(len(sums))
    noise = torch.randn(len(sums), generator=secure_generator(), dtype=torch.float64).numpy()
    # clipped to [0, 1] after the noise: post-processing costs no privacy, and a Dice outside
    # [0, 1] means nothing to a reader (and is what a server refuses from a site)
    means = np.clip((sums + scale * noise) / len(patients), 0.0, 1.0)
    return {
        "dice": float(means[0]),
        **{c: float(v) for c, v in zip(classes, means[1:], strict=True)},
    }


def _clipped_dice(patient: Mapping[str, Any], classes: list[str]) -> list[float]:
    """A patient's Dice, then each class's, each in [0, 1] (NaN counts as 0)."""
    per_class = patient.get("classes") or {c: patient for c in classes}
    values = [patient.get("dice"), *(per_class[c].get("dice") for c in classes)]
    return [
        min(max(float(v), 0.0), 1.0) if v is not None and math.isfinite(v) else 0.0 for v in values
    ]
