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
from privseg.federated import messages as M
from privseg.federated.rounds import ServerSettings, run_server
from privseg.federated.strategy import nanmean
from privseg.io import write_json
from privseg.training.modes import PRIVACY_KEYS


# ---- results.json ----------------------------------------------------------------------------
def build_results(
    cfg: Config,
    summary: dict[str, Any],
    *,
    reports: dict[str, dict] | None = None,
    wall_seconds: float,
) -> dict[str, Any]:
    """The ``results.json`` dict; ``reports`` (site-local files) add per-patient results."""
    reports = reports or {}
    dp = cfg.privacy.enabled
    history = summary["history"]
    last_eps = history[-1].get("epsilon_sites", {}) if history else {}
    sites = []
    for name in sorted(set(summary["test"]) | set(reports) | set(last_eps)):
        scal = summary["test"].get(name, {})
        rep = reports.get(name, {})
        test = rep.get("test", scal)
        privacy = rep.get("privacy") or {k: scal.get(k) for k in PRIVACY_KEYS if k in scal}
        if dp:
            privacy.setdefault("epsilon", last_eps.get(name))  # a site that dropped out
            privacy.setdefault("accountant", cfg.privacy.accountant)
        entry = {
            "name": name,
            "n_train": rep.get("n_train", summary["n_train"].get(name)),
            "dice": _f(test.get("dice")),
            "dice_sd": _f(test.get("dice_sd")),
            "hd95": _f(test.get("hd95")),
            "patients": test.get("patients", []),
            "completed": name in summary["test"] or name in reports,
        }
        for key in PRIVACY_KEYS:
            entry[key] = privacy.get(key) if dp else None
        sites.append(entry)
    pooled = [p["dice"] for s in sites for p in s["patients"]]
    dice = pooled or [s["dice"] for s in sites]
    eps = [s["epsilon"] for s in sites if s.get("epsilon") is not None]
    fed = cfg.federated
    return {
        "mode": "federated",
        "dp": dp,
        "unit": cfg.privacy.unit if dp else None,
        "target_epsilon": cfg.privacy.target_epsilon if dp else None,
        "sites": sites,
        "dice_mean": nanmean(dice),
        "dice_sd": float(np.nanstd(dice)) if dice else math.nan,
        "epsilon_max": max(eps) if eps else None,
        "history": history,
        "seconds_per_epoch": None,
        "seconds_per_round": float(np.mean([h["seconds"] for h in history])) if history else None,
        "wall_seconds": wall_seconds,
        "strategy": fed.strategy,
        "rounds": fed.rounds,
        "local_steps": fed.local_steps,
        "secure_aggregation": fed.secure_aggregation,
    }


def _f(v: Any) -> float:
    return M.scalar(v)


def save_final(out_dir: Path, cfg: Config, summary: dict[str, Any], run_id: str) -> None:
    """The final global model as a privseg checkpoint (``predict`` reads it)."""
    from privseg.training.checkpoint import save_checkpoint

    save_checkpoint(
        out_dir / "checkpoint.pt",
        summary["state_dict"],
        cfg,
        mode="federated",
        run_id=run_id,
        rounds=len(summary["history"]),
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
    from privseg.io import atomic_write_text

    fast_object_pulls()  # replies are read as soon as they are uploaded (see there)
    settings = ServerSettings.from_run_config(dict(context.run_config))
    started = time.perf_counter()
    atomic_write_text(settings.out_dir / "config.toml", settings.cfg.to_toml())
    summary = run_server(grid, settings)
    results = build_results(settings.cfg, summary, wall_seconds=time.perf_counter() - started)
    results["run_id"] = settings.run_id
    save_final(settings.out_dir, settings.cfg, summary, settings.run_id)
    write_json(settings.out_dir / "results.json", results)
