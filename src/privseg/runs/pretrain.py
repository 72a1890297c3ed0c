"""Public pretraining: one central run on a freshly generated public phantom population.

The data is privseg's public phantom (:mod:`privseg.data.scanners`: scanners and anatomy
outside the sites' ranges), generated here, so the run releases no patient: prepare verifies
the generator's claim, training records nothing in the privacy ledger, and results.json says
``data_origin.kind = "generated-public"`` with the generator's seed and settings. The
checkpoint may start any later run (``train.init``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from privseg.config import Config
from privseg.core.errors import ConfigError
from privseg.core.progress import Progress, no_progress
from privseg.core.results import CENTRAL
from privseg.data.phantom import synth_task
from privseg.data.scanners import PUBLIC
from privseg.runs.train import train


@dataclasses.dataclass(frozen=True)
class PublicPopulation:
    """How many public scanners and patients to generate, and how (the phantom's settings)."""

    scanners: int = 4
    patients_per_scanner: int = 8
    seed: int = 0
    size: int = 128
    slices: int = 32
    organ: str = "liver"


def pretrain(
    cfg: Config,
    *,
    out: Path,
    population: PublicPopulation = PublicPopulation(),
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Generate the public population, train on it centrally (``cfg``'s [train] and [model];
    ``data.sites`` follows the scanners) into the run folder ``out``; return its results.

    The generated task lives in a temporary folder: the cache (``out/cache``) and the
    generator record in results.json are enough to use or regenerate it.
    """
    if cfg.privacy.enabled:
        raise ConfigError(
            "privacy.enabled = true is invalid for pretrain: it trains on privseg's public "
            "phantom (generated, no patient), which needs no DP; set privacy.enabled = false"
        )
    cfg = cfg.replace(**{"data.sites": population.scanners, "data.partition": "auto"})
    with tempfile.TemporaryDirectory(prefix="privseg-public-") as tmp:
        task = synth_task(
            Path(tmp) / "public-phantom",
            sites=population.scanners,
            patients_per_site=population.patients_per_scanner,
            seed=population.seed,
            size=population.size,
            slices=population.slices,
            organ=population.organ,
            population=PUBLIC,
            progress=progress,
        )
        return train(cfg, data=task, out=out, mode=CENTRAL, progress=progress)
