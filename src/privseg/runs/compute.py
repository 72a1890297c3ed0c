"""The compute each training setting gets, and the equal-compute rule of `privseg run`.

Compute, per site, is two numbers: the sequential optimiser steps the model takes, and the
slices whose gradient is computed (steps x batch; for central training the pooled batch is
shared by the sites). The rule of ``study.compute = "equal"`` is stated once, in
:data:`privseg.core.study_result.COMPUTE_RULES`; :func:`equalise` applies it.
"""

from __future__ import annotations

from typing import Any

from privseg.config import Config
from privseg.core.results import CENTRAL, FEDERATED
from privseg.privacy.plan import planned_steps


def equalise(cfg: Config, mode: str, n_sites: int) -> Config:
    """``cfg`` for ``mode`` with the federated run's compute (``study.compute = "equal"``)."""
    if cfg.study.compute != "equal" or mode == FEDERATED:
        return cfg
    steps = cfg.federated.rounds * cfg.federated.local_steps
    changes: dict[str, Any] = {"train.steps": steps}
    if mode == CENTRAL:
        changes["train.batch_size"] = cfg.train.batch_size * n_sites
    return cfg.replace(**changes)


def compute_of(cfg: Config, mode: str, train_sizes: dict[str, int]) -> dict[str, Any]:
    """What one run of ``mode`` computes per site (``train_sizes``: training slices per site).

    With DP the batch is Poisson: the numbers are expectations.
    """
    batch = cfg.train.batch_size
    n_sites = len(train_sizes)
    if mode == CENTRAL:
        steps = planned_steps(cfg, sum(train_sizes.values()), federated=False)
        per_site = steps * batch / n_sites
    else:
        per = [planned_steps(cfg, n, federated=mode == FEDERATED) for n in train_sizes.values()]
        steps = max(per)
        per_site = (
            sum(p * min(batch, n) for p, n in zip(per, train_sizes.values(), strict=True)) / n_sites
        )
    return {
        "sequential_steps": int(steps),
        "batch_size": int(batch),
        "slices_per_site": float(per_site),
    }
