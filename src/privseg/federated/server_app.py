"""The Flower ServerApp: its wiring to the round loop, and the run's final files.

``app`` is the deployment ServerApp (Flower loads it as ``privseg.federated.server_app:app``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from privseg.config import Config
from privseg.core.classes import Classes
from privseg.core.results import FEDERATED, PRIVACY_KEYS, RunResult, SiteResult, nanmean
from privseg.core.run_folder import RunFolder
from privseg.federated import messages as M
from privseg.federated.rounds import ServerSettings, run_server
from privseg.federated.state import load_state


# ---- results.json ----------------------------------------------------------------------------
def build_results(
    cfg: Config,
    summary: dict[str, Any],
    *,
    reports: dict[str, dict] | None = None,
    wall_seconds: float,
) -> RunResult:
    """The run's results; ``reports`` (site-local files) add per-patient results."""
    reports = reports or {}
    dp = cfg.privacy.enabled
    history = summary["history"]
    last_eps = history[-1].get("epsilon_sites", {}) if history else {}
    sites = []
    sent = summary.get("releases", {})
    for name in sorted(set(summary["test"]) | set(reports) | set(last_eps)):
        scal = summary["test"].get(name, {})
        rep = reports.get(name, {})
        completed = name in summary["test"] or name in reports
        privacy = None
        if dp or name in sent or rep.get("privacy"):
            privacy = dict(rep.get("privacy") or _privacy_of(scal))
            privacy.setdefault("releases", sent.get(name))
            privacy.setdefault("accountant", cfg.privacy.accountant)
            if not completed:  # dropped out: what it last reported, it may have spent more
                privacy["epsilon"] = last_eps.get(name)
        site = SiteResult.from_test(
            name,
            rep.get("n_train", summary["n_train"].get(name)),
            rep.get("test") or scalars_to_test_metrics(scal, cfg),
            privacy,
        )
        site.completed = completed
        if privacy is not None:
            site.epsilon_lower_bound = not completed
        sites.append(site)
    _local_val_curves(history, reports)
    fed = cfg.federated
    result = RunResult.of(cfg.privacy, FEDERATED, sites, history)
    result.seconds_per_round = float(np.mean([h["seconds"] for h in history])) if history else None
    result.wall_seconds = wall_seconds
    result.federation = {
        "strategy": fed.strategy,
        "rounds": fed.rounds,
        "local_steps": fed.local_steps,
        "secure_aggregation": fed.secure_aggregation,
    }
    return result


def _privacy_of(scal: dict[str, float]) -> dict[str, Any]:
    """A site's privacy fields from its final reply's scalars (all floats on the wire): counts
    as whole numbers, a missing value (NaN) as None, never 0."""
    out: dict[str, Any] = {}
    for key in PRIVACY_KEYS:
        if key in scal:
            value = scal[key]
            out[key] = None if math.isnan(value) else int(value) if key == "steps" else value
    return out


def _local_val_curves(history: list[dict[str, Any]], reports: dict[str, dict]) -> None:
    """A DP run's val curve from the sites' own reports (they never send it): one machine
    (simulation) has them; a deployment's history keeps no val Dice."""
    by_round: dict[int, dict[str, float]] = {}
    for name, rep in reports.items():
        for point in rep.get("val_curve") or []:
            by_round.setdefault(int(point["round"]), {})[name] = M.scalar(point.get("dice"))
    for entry in history:
        # a site scores the incoming model of round r, i.e. round r - 1's result
        sites = by_round.get(int(entry["round"]) + 1)
        if sites and entry.get("val_dice") is None:
            entry["val_dice_sites"] = sites
            entry["val_dice"] = nanmean(sites.values())


def scalars_to_test_metrics(scal: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A site's test metrics from its scalar reply (a deployment: no report file here)."""
    names = Classes.of(cfg.data).names
    classes = {n: {"dice": scal[k]} for n, k in zip(names, M.CLASS_DICE, strict=False) if k in scal}
    return {**scal, "classes": classes}


def save_final(out_dir: Path, cfg: Config, summary: dict[str, Any], run_id: str) -> None:
    """The final global model as a privseg checkpoint (``predict`` reads it)."""
    from privseg.models.checkpoint import save_checkpoint
    from privseg.models.init import load_init, trained_on

    init = load_init(cfg)
    save_checkpoint(
        RunFolder(out_dir).checkpoint,
        summary["state_dict"],
        cfg,
        mode=FEDERATED,
        run_id=run_id,
        rounds=len(summary["history"]),
        # the server never sees the sites' data: counted private (never wrongly public)
        trained_on=trained_on(cfg, public=None, init=init.record if init else None),
    )


# ---- ServerApps ------------------------------------------------------------------------------
def make_server_app(
    settings: ServerSettings, on_done: Callable[[dict[str, Any]], None] | None = None
) -> ServerApp:
    """A ServerApp bound to ``settings`` (simulation); ``on_done`` receives the summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_server(grid, settings)
        if on_done is not None:
            on_done(summary)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment: settings from the run config; writes results.json and checkpoint.pt."""
    from privseg.federated.flower_compat import fast_object_pulls

    fast_object_pulls()  # replies are read as soon as they are uploaded (see there)
    settings = ServerSettings.from_run_config(dict(context.run_config))
    folder = RunFolder(settings.out_dir)
    started = time.perf_counter()
    if settings.resume:  # refuse an incompatible resume before the run's config is replaced
        load_state(settings.out_dir, settings.cfg)
    folder.write_config(settings.cfg)
    summary = run_server(grid, settings)
    result = build_results(settings.cfg, summary, wall_seconds=time.perf_counter() - started)
    result.provenance["run_id"] = summary["run_id"]
    save_final(settings.out_dir, settings.cfg, summary, summary["run_id"])
    result.write(folder.results)
