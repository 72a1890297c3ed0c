"""Central and local-only training (federated lives in :mod:`privseg.federated`).

Both modes are thin schedules over :class:`~privseg.training.trainer.SiteTrainer`; each
returns the ``results.json`` dictionary documented in the README.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from privseg.config import Config
from privseg.training.checkpoint import save_checkpoint
from privseg.training.trainer import (
    SiteTrainer,
    expected_batch_size,
    make_site_privacy,
    privacy_units,
    steps_per_epoch,
)

Progress = Callable[[str, int, int], None]
"""``progress(description, completed, total)``: how long-running steps report progress."""

PRIVACY_KEYS = (
    "epsilon",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "clip_norm",
    "accountant",
)


def _no_progress(description: str, completed: int, total: int) -> None:
    return None


def planned_steps(cfg: Config, train: Any) -> int:
    """Steps for ``train.epochs`` passes over the site's units (slices or patients)."""
    units = privacy_units(train, cfg.privacy.unit if cfg.privacy.enabled else "slice")
    n_units = len(np.unique(units))
    batch = expected_batch_size(cfg, units) if cfg.privacy.enabled else cfg.train.batch_size
    return cfg.train.epochs * steps_per_epoch(n_units, batch)


def train_site(
    cfg: Config,
    *,
    name: str,
    train: Any,
    val_splits: dict[str, Any],
    out_dir: Path,
    run_id: str,
    progress: Progress,
) -> tuple[SiteTrainer, list[dict[str, Any]], float]:
    """Train one model for ``cfg.train.epochs`` epochs on ``train``; validate after each epoch.

    Validation Dice is computed for the learning curve only; the final model is reported (no
    model selection on private validation data).
    """
    total = planned_steps(cfg, train)
    per_epoch = max(1, total // cfg.train.epochs)
    privacy = None
    if cfg.privacy.enabled:
        privacy = make_site_privacy(
            cfg,
            site=name,
            train=train,
            planned_steps=total,
            ledger_path=out_dir / "ledgers" / f"{name}.sqlite",
            run_id=run_id,
        )
    trainer = SiteTrainer(cfg, name=name, train=train, privacy=privacy, planned_steps=total)
    history: list[dict[str, Any]] = []
    done = 0
    train_seconds = 0.0
    for epoch in range(1, cfg.train.epochs + 1):
        steps = per_epoch if epoch < cfg.train.epochs else total - done
        base = done

        def on_step(i: int, n: int, base: int = base, epoch: int = epoch) -> None:
            progress(f"{name}: epoch {epoch}/{cfg.train.epochs}", base + i, total)

        _, metrics = trainer.fit(None, steps, run_id=run_id, on_step=on_step)
        done += steps
        train_seconds += metrics["seconds"]
        val = {site: trainer.evaluate(None, split) for site, split in val_splits.items()}
        val_dice = {site: m["dice"] for site, m in val.items()}
        history.append(
            {
                "epoch": epoch,
                "train_loss": metrics["train_loss"],
                "val_dice": _nanmean(list(val_dice.values())),
                "val_dice_sites": val_dice,
                "epsilon_max": metrics["epsilon"] if privacy is not None else None,
                "seconds": metrics["seconds"],
            }
        )
    return trainer, history, train_seconds / cfg.train.epochs


def site_entry(
    name: str, n_train: int, test_metrics: dict[str, Any], privacy: dict[str, Any] | None
) -> dict[str, Any]:
    """One ``sites[]`` row of results.json."""
    entry: dict[str, Any] = {
        "name": name,
        "n_train": n_train,
        "dice": test_metrics.get("dice", math.nan),
        "dice_sd": test_metrics.get("dice_sd", math.nan),
        "hd95": test_metrics.get("hd95", math.nan),
        "patients": test_metrics.get("patients", []),
    }
    for key in PRIVACY_KEYS:
        entry[key] = privacy.get(key) if privacy else None
    return entry


def run_central(
    cfg: Config,
    cache: Any,
    out_dir: Path,
    progress: Progress = _no_progress,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Pool every site's training data in one place (the non-federated upper bound)."""
    from privseg.data.cache import SliceSplit

    run_id = run_id or uuid.uuid4().hex
    started = time.perf_counter()
    train = SliceSplit.concat([cache.split(s, "train") for s in cache.sites])
    vals = {s: cache.split(s, "val") for s in cache.sites}
    trainer, history, per_epoch = train_site(
        cfg,
        name="central",
        train=train,
        val_splits=vals,
        out_dir=out_dir,
        run_id=run_id,
        progress=progress,
    )
    privacy = trainer.privacy_summary()
    sites = [
        site_entry(
            s, len(cache.split(s, "train")), trainer.evaluate(None, cache.split(s, "test")), privacy
        )
        for s in cache.sites
    ]
    save_checkpoint(
        out_dir / "checkpoint.pt", trainer.state_dict(), cfg, mode="central", run_id=run_id
    )
    return _results(cfg, "central", sites, history, started, per_epoch, privacy)


def run_local(
    cfg: Config,
    cache: Any,
    out_dir: Path,
    progress: Progress = _no_progress,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Each site trains alone; scored on its own test split and on every other site's."""
    run_id = run_id or uuid.uuid4().hex
    started = time.perf_counter()
    sites, histories, per_epochs = [], [], []
    for site in cache.sites:
        trainer, history, per_epoch = train_site(
            cfg,
            name=site,
            train=cache.split(site, "train"),
            val_splits={site: cache.split(site, "val")},
            out_dir=out_dir,
            run_id=run_id,
            progress=progress,
        )
        entry = site_entry(
            site,
            trainer.num_examples,
            trainer.evaluate(None, cache.split(site, "test")),
            trainer.privacy_summary(),
        )
        entry["cross"] = {
            other: trainer.evaluate(None, cache.split(other, "test"))["dice"]
            for other in cache.sites
            if other != site
        }
        sites.append(entry)
        histories.append(history)
        per_epochs.append(per_epoch)
        save_checkpoint(
            out_dir / "checkpoints" / f"{site}.pt",
            trainer.state_dict(),
            cfg,
            mode="local",
            site=site,
            run_id=run_id,
        )
    history = _merge_histories(histories, [s["name"] for s in sites])
    privacy = None
    if cfg.privacy.enabled:
        eps = [s["epsilon"] for s in sites if s["epsilon"] is not None]
        privacy = {"epsilon": max(eps) if eps else None}
    return _results(cfg, "local", sites, history, started, float(np.mean(per_epochs)), privacy)


def _merge_histories(histories: list[list[dict[str, Any]]], names: list[str]) -> list[dict]:
    """Per-epoch means over sites trained one after another (local-only mode)."""
    merged = []
    for rows in zip(*histories, strict=True):
        val_sites = {n: r["val_dice"] for n, r in zip(names, rows, strict=True)}
        eps = [r["epsilon_max"] for r in rows if r["epsilon_max"] is not None]
        merged.append(
            {
                "epoch": rows[0]["epoch"],
                "train_loss": _nanmean([r["train_loss"] for r in rows]),
                "val_dice": _nanmean(list(val_sites.values())),
                "val_dice_sites": val_sites,
                "epsilon_max": max(eps) if eps else None,
                "seconds": float(sum(r["seconds"] for r in rows)),
            }
        )
    return merged


def _nanmean(values: list[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else math.nan


def _results(
    cfg: Config,
    mode: str,
    sites: list[dict[str, Any]],
    history: list[dict],
    started: float,
    per_epoch: float,
    privacy: dict[str, Any] | None,
) -> dict[str, Any]:
    dice_all = [p["dice"] for s in sites for p in s["patients"]]
    eps = [s["epsilon"] for s in sites if s.get("epsilon") is not None]
    return {
        "mode": mode,
        "dp": cfg.privacy.enabled,
        "unit": cfg.privacy.unit if cfg.privacy.enabled else None,
        "target_epsilon": cfg.privacy.target_epsilon if cfg.privacy.enabled else None,
        "sites": sites,
        "dice_mean": _nanmean(dice_all),
        "dice_sd": float(np.nanstd(dice_all)) if dice_all else math.nan,
        "epsilon_max": max(eps) if eps else None,
        "history": history,
        "seconds_per_epoch": per_epoch,
        "seconds_per_round": None,
        "wall_seconds": time.perf_counter() - started,
    }
