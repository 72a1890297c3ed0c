"""One training run = one results folder (config.toml, results.json, checkpoint, figure)."""

from __future__ import annotations

import logging
import platform
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch

from privseg import __version__
from privseg.config import Config
from privseg.errors import DataError
from privseg.io import atomic_write_text, write_json
from privseg.training.modes import Progress, _no_progress, run_central, run_local

log = logging.getLogger(__name__)

Mode = Literal["central", "local", "federated"]
MODES: tuple[str, ...] = ("central", "local", "federated")


def resolve_cache(data: Path, cfg: Config, work_dir: Path, progress: Progress) -> Any:
    """Open a prepared slice cache, or prepare one from an MSD task folder into ``work_dir``."""
    from privseg.data.cache import SliceCache, prepare_cache

    data = Path(data)
    if (data / "manifest.json").is_file():
        return SliceCache.open(data)
    if (data / "dataset.json").is_file():
        return prepare_cache(data, work_dir, cfg.data, seed=cfg.seed, progress=progress)
    raise DataError(
        f"{data} is neither a prepared cache (manifest.json) nor an MSD task folder "
        "(dataset.json); run `privseg data prepare` or `privseg data synth` first"
    )


def train(
    cfg: Config,
    *,
    data: Path,
    out: Path,
    mode: Mode,
    progress: Progress = _no_progress,
    resume: bool = False,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train in ``mode`` and write the run folder ``out``; return its results dictionary."""
    if mode not in MODES:
        raise DataError(f"mode {mode!r} is invalid: allowed values are {', '.join(MODES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    apply_threads(cfg)
    cache = resolve_cache(data, cfg, cache_dir or out / "cache", progress)
    atomic_write_text(out / "config.toml", cfg.to_toml())
    run_id = uuid.uuid4().hex
    started = time.perf_counter()
    if mode == "central":
        results = run_central(cfg, cache, out, progress, run_id=run_id)
    elif mode == "local":
        results = run_local(cfg, cache, out, progress, run_id=run_id)
    else:
        from privseg.federated.simulation import run_federated

        def fed_progress(event: dict[str, Any]) -> None:
            progress(
                f"federated: round {event.get('round', 0)}/{cfg.federated.rounds}",
                int(event.get("round", 0)),
                cfg.federated.rounds,
            )

        results = run_federated(
            cfg,
            cache_dir=Path(cache.root),
            out_dir=out,
            run_id=run_id,
            resume=resume,
            progress=fed_progress,
        )
    results.update(
        {
            "privseg_version": __version__,
            "run_id": run_id,
            "cache_dir": str(Path(cache.root).resolve()),
            "wall_seconds": time.perf_counter() - started,
            "machine": machine_info(),
        }
    )
    if cfg.privacy.enabled and results.get("unit") == "slice":
        results["privacy_note"] = SLICE_UNIT_NOTE
    write_json(out / "results.json", results)
    _plot(results, out)
    return results


SLICE_UNIT_NOTE = (
    "Privacy unit is one slice: epsilon bounds what leaks about any single slice, not about a "
    "patient, whose many correlated slices each count separately. Use privacy.unit = "
    '"patient" for a patient-level guarantee.'
)


def apply_threads(cfg: Config) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def machine_info() -> dict[str, Any]:
    import os

    import flwr
    import opacus

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "flwr": getattr(flwr, "__version__", "unknown"),
    }


def _plot(results: dict[str, Any], out: Path) -> None:
    try:
        from privseg.report.figures import plot_learning_curve
    except ImportError:  # the report package is optional for a training run
        return
    title = f"{results['mode']} {'DP' if results['dp'] else 'non-private'}"
    plot_learning_curve(results["history"], out / "learning_curve.png", title)
