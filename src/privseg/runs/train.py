"""One training run = one run folder (config.toml, results.json, checkpoint, figure).

The run layer sits above training and federation: it picks the mode, opens (or prepares) the
data, and writes the folder; the modes themselves know nothing of each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from privseg import __version__
from privseg.config import Config
from privseg.data.prepare import resolve_cache
from privseg.device import describe_device, resolve_device
from privseg.errors import ConfigError, DataError
from privseg.io import private_file
from privseg.progress import Progress, no_progress
from privseg.results import CENTRAL, FEDERATED, LOCAL, MODES, RunResult
from privseg.run_folder import RunFolder, RunInputs
from privseg.runs.compute import compute_of
from privseg.training.modes import run_central, run_local

log = logging.getLogger(__name__)

Mode = Literal["central", "local", "federated"]  # results.MODES, spelled for type checkers


def train(
    cfg: Config,
    *,
    data: Path,
    out: Path,
    mode: Mode,
    progress: Progress = no_progress,
    resume: bool = False,
    cache_dir: Path | None = None,
    simulation: str | None = None,
) -> dict[str, Any]:
    """Train in ``mode`` and write the run folder ``out``; return its results dictionary.

    ``simulation``: where a federated run's sites run, "ray" or "in-process" (default: Ray
    when installed, see :func:`privseg.federated.simulation.run_federated`).
    """
    if mode not in MODES:
        raise DataError(f"mode {mode!r} is invalid: allowed values are {', '.join(MODES)}")
    if resume and mode != FEDERATED:
        raise ConfigError(f"--resume continues a federated run; mode {mode!r} starts afresh")
    device = resolve_device(cfg.train.device)  # a GPU this machine lacks: refused before output
    folder = RunFolder(Path(out)).claim("run", inputs=[data])
    if resume:  # refuse an incompatible resume before anything in the folder is replaced
        from privseg.federated.state import load_state

        load_state(folder.root, cfg)
    apply_threads(cfg)
    with run_log(folder):
        cache = resolve_cache(data, cfg, cache_dir or folder.cache, progress)
        folder.admit(RunInputs(mode, cache.content_fingerprint, str(data)), resume=resume)
        folder.write_config(cfg)
        device_name = describe_device(device)
        run_id = uuid.uuid4().hex
        started = time.perf_counter()
        log.info("privseg %s: %s run into %s on %s", __version__, mode, folder.root, device_name)
        if mode == CENTRAL:
            result = run_central(cfg, cache, folder, progress, run_id=run_id)
        elif mode == LOCAL:
            result = run_local(cfg, cache, folder, progress, run_id=run_id)
        else:
            result = _run_federated(
                cfg, cache, folder, progress, run_id=run_id, resume=resume, backend=simulation
            )
    result.wall_seconds = time.perf_counter() - started
    sizes = {s: len(cache.split(s, "train")) for s in cache.sites}
    result.compute = compute_of(cfg, mode, sizes)
    result.provenance.update(
        {
            "privseg_version": __version__,
            "run_id": result.provenance.get("run_id", run_id),  # a resumed run keeps its id
            "cache_dir": str(Path(cache.root).resolve()),
            "machine": machine_info(),
            "device": device_name,
        }
    )
    results = result.write(folder.results)
    _plot(result, folder)
    return results


def _run_federated(
    cfg: Config,
    cache: Any,
    folder: RunFolder,
    progress: Progress,
    *,
    run_id: str,
    resume: bool,
    backend: str | None,
) -> RunResult:
    from privseg.federated.simulation import run_federated

    def on_round(entry: dict[str, Any]) -> None:
        rnd = int(entry.get("round", 0))
        progress(f"federated: round {rnd}/{cfg.federated.rounds}", rnd, cfg.federated.rounds)

    return run_federated(
        cfg,
        cache_dir=Path(cache.root),
        out_dir=folder.root,
        run_id=run_id,
        resume=resume,
        progress=on_round,
        backend=backend,
    )


@contextlib.contextmanager
def run_log(folder: RunFolder) -> Iterator[None]:
    """privseg's log messages (info and up) also go to the run folder's ``run.log``."""
    handler = logging.FileHandler(private_file(folder.log), encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("privseg")
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def apply_threads(cfg: Config) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def machine_info() -> dict[str, Any]:
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


def _plot(result: RunResult, folder: RunFolder) -> None:
    from privseg.report.figures import plot_learning_curve

    title = f"{result.mode} {'DP' if result.dp else 'non-private'}"
    plot_learning_curve(result.history, folder.figure("learning_curve"), title)
