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
from typing import Any

import torch

from privseg import __version__
from privseg.config import Config
from privseg.core.choices import MODES, Mode
from privseg.core.device import describe_device, resolve_device
from privseg.core.errors import ConfigError, DataError
from privseg.core.io import private_file
from privseg.core.logs import OursOrAtLeast
from privseg.core.progress import Progress, logged, no_progress
from privseg.core.results import CENTRAL, FEDERATED, LOCAL, PUBLIC_ORIGIN, PUBLIC_PRIVACY, RunResult
from privseg.core.run_folder import RunFolder, RunInputs
from privseg.data.cache import SliceCache
from privseg.data.prepare import resolve_cache
from privseg.data.public import public_data
from privseg.models.init import load_init
from privseg.runs.compute import compute_of
from privseg.runs.modes import RunContext, run_central, run_local

log = logging.getLogger(__name__)


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
    if mode == "federated" and cfg.privacy.audit_canaries:
        raise ConfigError(
            "privacy.audit_canaries is not supported in federated runs yet (issue 25): set it "
            "to 0, or audit a central or local run"
        )
    device = resolve_device(cfg.train.device)  # a GPU this machine lacks: refused before output
    init = load_init(cfg)  # a refused or mismatched train.init: before any output too
    folder = RunFolder(Path(out)).claim("run", inputs=[data])
    rounds_done = 0
    if resume:  # refuse an incompatible resume before anything in the folder is replaced
        from privseg.federated.state import load_state

        rounds_done = int((load_state(folder.root, cfg) or {}).get("round", 0))
    apply_threads(cfg)
    progress = logged(progress)
    with run_log(folder):

        def inputs(cache: SliceCache) -> RunInputs:
            return RunInputs(mode, cache.content_fingerprint, str(data))

        cache = resolve_cache(
            data,
            cfg,
            cache_dir or folder.cache,
            progress,
            accept=lambda c: folder.check_reuse(inputs(c), resume=resume),
        )
        folder.admit(inputs(cache), resume=resume)
        folder.write_config(cfg)
        device_name = describe_device(device)
        run_id = uuid.uuid4().hex
        started = time.perf_counter()
        log.info("privseg %s: %s run into %s on %s", __version__, mode, folder.root, device_name)
        if mode in (CENTRAL, LOCAL):
            run = RunContext(cfg, cache, folder, run_id, progress)
            result = (run_central if mode == CENTRAL else run_local)(run)
        else:
            progress(
                f"federated: round {rounds_done}/{cfg.federated.rounds}",
                rounds_done,
                cfg.federated.rounds,
            )
            result = _run_federated(
                cfg, cache, folder, progress, run_id=run_id, resume=resume, backend=simulation
            )
    result.wall_seconds = time.perf_counter() - started
    sizes = {s: len(cache.split(s, "train")) for s in cache.sites}
    result.compute = compute_of(cfg, mode, sizes)
    public = public_data(cache)
    if public is not None:  # no site's data: every site entry releases no one
        for site in result.sites:
            site.privacy = dict(PUBLIC_PRIVACY)
    result.provenance.update(
        {
            "privseg_version": __version__,
            "run_id": result.provenance.get("run_id", run_id),  # a resumed run keeps its id
            "cache_dir": str(Path(cache.root).resolve()),
            "machine": machine_info(),
            "device": device_name,
            "data_origin": data_origin(public),
            "init": init.record if init is not None else None,
        }
    )
    results = result.write(folder.results)
    _plot(result, folder)
    return results


def data_origin(public: dict[str, Any] | None) -> dict[str, Any]:
    """results.json ``data_origin``: private data, or the public phantom's generator record."""
    if public is None:
        return {"kind": "private"}
    return {
        "kind": PUBLIC_ORIGIN,
        "generator": public,
        "epsilon": 0.0,
        "note": "privseg's public phantom population: generated data, no site's patients; "
        "epsilon 0 by construction, nothing recorded in the privacy ledger",
    }


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
        rnd, rounds = int(entry.get("round", 0)), cfg.federated.rounds
        loss, eps = entry.get("train_loss"), entry.get("epsilon_max")
        shown = "" if loss is None else f", train loss {loss:.3f}"
        shown += "" if eps is None else f", ε {eps:.2f} so far"
        progress(f"federated: round {rnd}/{rounds}{shown}", rnd, rounds)

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
    """privseg's log messages (info and up, progress lines included) and other libraries'
    warnings (their loggers', and ``warnings.warn``'s once the CLI routes them) also go to the
    run folder's ``run.log``."""
    handler = logging.FileHandler(private_file(folder.log), encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.addFilter(OursOrAtLeast(logging.WARNING))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("privseg")
    level = ours.level
    logging.getLogger().addHandler(handler)
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        ours.setLevel(level)
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
