"""All sites on one machine through Flower's simulation engine (Ray)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privseg.config import Config
from privseg.core.errors import DataError, FederationError, PrivsegError
from privseg.core.io import make_folder, read_json
from privseg.core.results import RunResult
from privseg.core.run_folder import RunFolder
from privseg.federated import messages as M
from privseg.federated.client_app import TrainerFactory, make_client_app, release_trainers
from privseg.federated.flower_compat import in_process_simulation
from privseg.federated.reaper import reaping
from privseg.federated.rounds import RoundCallback, ServerSettings
from privseg.federated.server_app import build_results, make_server_app, save_final

log = logging.getLogger(__name__)
#: Replies land in an in-memory state: polling it every 5-50 ms costs nothing, while the
#: deployment poll (up to 10 % of the phase) added ~0.2 s to every simulated round.
SIMULATION_POLL = (0.005, 0.05, 0.02)
BACKENDS = ("ray", "in-process")


def backend_config(cpus: int | None = None) -> dict[str, Any]:
    """One Ray actor that uses ``cpus`` cores: sites train one after another, each with
    every core, and a site's trainer stays in that one process between rounds."""
    cpus = max(1, cpus or os.cpu_count() or 1)
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "logging_level": "error",
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        flwr_log.setLevel(level)


@contextlib.contextmanager
def _ray_engine() -> Iterator[str]:
    """Flower's Ray backend, with SIGTERM's handler kept while Ray starts.

    ``ray.init`` replaces it with ``sys.exit(15)`` (through
    ``ray._private.utils.set_sigterm_handler``, Ray 2.55), which unwinds through Flower's
    threads into Ray's tracebacks and its own ``exit(1)``, in place of the handler privseg set
    (the CLI's one-line stop, ``privseg.cli.common.interruptible``)."""
    from ray._private import utils

    saved = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield "ray"
    finally:
        utils.set_sigterm_handler = saved


def check_site_plans(cfg: Config, cache: Any) -> None:
    """Before Flower starts, what each site will check in round 1: its DP plan for the whole
    run calibrates on its training split (an unreachable privacy.target_epsilon, a delta too
    large for its data, ...). Errors name the site. Its ledger can only refuse more."""
    if not cfg.privacy.enabled:
        return
    from privseg.privacy.plan import DPPlan

    for site in cache.sites:
        try:
            DPPlan.for_split(cfg, cache.split(site, "train"), federated=True, site=site)
        except PrivsegError as exc:
            raise type(exc)(f"site {site!r}: {exc}") from None


def run_federated(
    cfg: Config,
    *,
    cache_dir: Path,
    out_dir: Path,
    run_id: str,
    resume: bool = False,
    progress: RoundCallback | None = None,
    sites: list[str] | None = None,
    trainer_factory: TrainerFactory | None = None,
    cpus: int | None = None,
    backend: str | None = None,
) -> RunResult:
    """Run the federation in simulation; return its results.

    Each site's releases go to the ledger store of its patients (the
    per-user store, ``privseg.privacy.stores``) and its local test report is
    ``out_dir/sites/<site>.json`` (what a real site would keep to itself).
    ``sites`` and ``trainer_factory`` replace the slice cache and the real trainer in tests.
    ``backend``: where the sites' ClientApps run, "ray" (one Ray actor) or "in-process" (this
    process, no Ray: also what a machine without Ray gets); None = "ray" when installed.
    """
    # Ray would hide the GPUs from actors that reserve none (ours: one actor trains every site
    # in turn, on train.device); "0" leaves CUDA_VISIBLE_DEVICES as it is (and quiets Ray).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # read when Ray is imported: its C++ (absl) stack dump at SIGTERM is noise, not a crash
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from flwr.simulation import run_simulation

    if backend is None:
        backend = "ray" if importlib.util.find_spec("ray") is not None else "in-process"
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r} is invalid: allowed {', '.join(BACKENDS)}")
    if backend == "in-process":
        log.info("simulation without Ray: the sites' ClientApps run in this process")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    make_folder(out_dir)
    if sites is None:
        from privseg.data.cache import SliceCache

        cache = SliceCache.open(cache_dir)
        sites = list(cache.sites)
        check_site_plans(cfg, cache)  # a resume as well: its config may change the rounds
    if len(sites) < cfg.federated.min_sites:
        raise DataError(
            f"{len(sites)} site(s) in {cache_dir} but federated.min_sites = "
            f"{cfg.federated.min_sites}"
        )
    if not resume:
        for name in sites:  # a fresh run must not read last run's reports
            RunFolder(out_dir).site_report(name).unlink(missing_ok=True)
    done: dict[str, Any] = {}
    settings = ServerSettings(
        cfg=cfg,
        out_dir=out_dir,
        run_id=run_id,
        resume=resume,
        progress=progress,
        node_wait=60.0,
        poll=SIMULATION_POLL,
    )
    client = make_client_app(
        {
            M.NODE_SITES: ",".join(sites),
            M.NODE_DATA_DIR: str(cache_dir),
            M.NODE_OUT_DIR: str(out_dir),
        },
        trainer_factory,
    )
    engine = in_process_simulation() if backend == "in-process" else _ray_engine()
    # Ray's raylet, agents and workers end within 1 s of a killed privseg (see reaper)
    with _quiet(), reaping(), engine as backend_name:
        try:
            run_simulation(
                server_app=make_server_app(settings, on_done=done.update),
                client_app=client,
                num_supernodes=len(sites),
                backend_name=backend_name,
                backend_config=backend_config(cpus),  # type: ignore[arg-type]
            )
        except FederationError:
            raise
        except RuntimeError as exc:
            raise FederationError(f"the simulation failed: {exc}") from exc
        finally:
            release_trainers()  # in-process, the sites' models would outlive the run
    if not done:
        raise FederationError("the simulation ended without a result (see the log above)")
    reports = {}
    for name in sites:
        path = RunFolder(out_dir).site_report(name)
        if path.is_file():
            reports[name] = read_json(path)
    results = build_results(cfg, done, reports=reports, wall_seconds=time.perf_counter() - started)
    save_final(out_dir, cfg, done, done["run_id"])
    results.provenance["run_id"] = done["run_id"]
    return results
