"""Central and local-only training (federated lives in :mod:`privseg.federated`).

Both modes are thin schedules over :class:`~privseg.training.trainer.SiteTrainer`; each
returns a :class:`~privseg.core.results.RunResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from privseg.config import Config
from privseg.core.io import write_json
from privseg.core.progress import Progress, no_progress
from privseg.core.results import CENTRAL, LOCAL, RunResult, SiteResult, nanmean
from privseg.core.run_folder import RunFolder
from privseg.data.public import public_data
from privseg.models.checkpoint import save_checkpoint
from privseg.models.init import load_init, trained_on
from privseg.privacy.canaries import attach_canaries
from privseg.privacy.plan import count_units, planned_steps, unit_ids
from privseg.training.trainer import SiteTrainer, open_privacy


def site_steps(cfg: Config, train: Any) -> int:
    """``train.steps``, or the steps of ``train.epochs`` passes over the site's units."""
    unit = cfg.privacy.unit if cfg.privacy.enabled else "slice"
    return planned_steps(cfg, count_units(unit_ids(train, unit)), federated=False)


def train_site(
    cfg: Config,
    *,
    name: str,
    train: Any,
    val_splits: dict[str, Any],
    cache: Any,
    run_id: str,
    progress: Progress,
    folder: RunFolder,
) -> tuple[SiteTrainer, list[dict[str, Any]], float]:
    """Train one model on ``train`` in ``train.epochs`` parts; validate after each part.

    Validation Dice is computed for the learning curve only; the final model is reported (no
    model selection on private validation data). With ``privacy.audit_canaries`` the site's
    canaries are committed in ``folder`` before the first step and revealed after the last.
    """
    total = site_steps(cfg, train)
    parts = min(cfg.train.epochs, total)  # an epoch, or a part of ``train.steps``
    per_epoch = total // parts
    privacy = open_privacy(cfg, cache, site=name, train=train, planned_steps=total, run_id=run_id)
    trainer = SiteTrainer(cfg, name=name, train=train, privacy=privacy, planned_steps=total)
    canaries = None
    if privacy is not None and cfg.privacy.audit_canaries:
        canaries = attach_canaries(
            privacy.gradient,
            trainer.model,
            count=cfg.privacy.audit_canaries,
            sample_rate=privacy.sample_rate,
        )
        write_json(folder.canaries(name, revealed=False), canaries.commit())
    init = load_init(cfg)
    start = init.state_dict if init is not None else None  # else the trainer's seeded model
    history: list[dict[str, Any]] = []
    done = 0
    train_seconds = 0.0
    for epoch in range(1, parts + 1):
        steps = per_epoch if epoch < parts else total - done
        base = done

        shown = f"{name}: epoch {epoch}/{parts}{_so_far(history)}"

        def on_step(i: int, n: int, base: int = base, shown: str = shown) -> None:
            progress(shown, base + i, total)

        _, metrics = trainer.fit(
            start if epoch == 1 else None, steps, run_id=run_id, on_step=on_step
        )
        done += steps
        train_seconds += metrics["seconds"]
        val = {site: trainer.evaluate(None, split) for site, split in val_splits.items()}
        val_dice = {site: m["dice"] for site, m in val.items()}
        history.append(
            {
                "epoch": epoch,
                "train_loss": metrics["train_loss"],
                "val_dice": nanmean(val_dice.values()),
                "val_dice_sites": val_dice,
                "epsilon_max": metrics["epsilon"] if privacy is not None else None,
                "seconds": metrics["seconds"],
            }
        )
    if canaries is not None:
        write_json(folder.canaries(name, revealed=True), canaries.reveal())
    return trainer, history, train_seconds / parts


def _so_far(history: list[dict[str, Any]]) -> str:
    """The last finished epoch's train loss, validation Dice and epsilon, for progress."""
    if not history:
        return ""
    last = history[-1]
    eps = last["epsilon_max"]
    return f", train loss {last['train_loss']:.3f}, val Dice {last['val_dice']:.3f}" + (
        "" if eps is None else f", ε {eps:.2f} so far"
    )


@dataclass(frozen=True)
class RunContext:
    """What a central or local run works with: its config, data, folder and id."""

    cfg: Config
    cache: Any
    folder: RunFolder
    run_id: str
    progress: Progress = no_progress


def run_central(run: RunContext) -> RunResult:
    """Pool every site's training data in one place (the non-federated upper bound)."""
    from privseg.data.cache import SliceSplit

    cfg, cache, folder, progress, run_id = run.cfg, run.cache, run.folder, run.progress, run.run_id
    started = time.perf_counter()
    train = SliceSplit.concat([cache.split(s, "train") for s in cache.sites])
    vals = {s: cache.split(s, "val") for s in cache.sites}
    trainer, history, per_epoch = train_site(
        cfg,
        name=CENTRAL,
        train=train,
        val_splits=vals,
        cache=cache,
        run_id=run_id,
        progress=progress,
        folder=folder,
    )
    sites = [
        SiteResult.from_test(
            s,
            len(cache.split(s, "train")),
            trainer.evaluate(None, cache.split(s, "test")),
            trainer.privacy_summary(s),  # each site's patients, as they spent
        )
        for s in cache.sites
    ]
    save_checkpoint(
        folder.checkpoint,
        trainer.state_dict(),
        cfg,
        mode=CENTRAL,
        run_id=run_id,
        trained_on=_trained_on(cfg, cache),
    )
    return _result(cfg, CENTRAL, sites, history, started, per_epoch)


def run_local(run: RunContext) -> RunResult:
    """Each site trains alone; scored on its own test split and on every other site's."""
    cfg, cache, folder, progress, run_id = run.cfg, run.cache, run.folder, run.progress, run.run_id
    started = time.perf_counter()
    sites: list[SiteResult] = []
    histories, per_epochs = [], []
    for site in cache.sites:
        trainer, history, per_epoch = train_site(
            cfg,
            name=site,
            train=cache.split(site, "train"),
            val_splits={site: cache.split(site, "val")},
            cache=cache,
            run_id=run_id,
            progress=progress,
            folder=folder,
        )
        entry = SiteResult.from_test(
            site,
            trainer.num_examples,
            trainer.evaluate(None, cache.split(site, "test")),
            trainer.privacy_summary(),
        )
        entry.cross = {
            other: trainer.evaluate(None, cache.split(other, "test"))["dice"]
            for other in cache.sites
            if other != site
        }
        sites.append(entry)
        histories.append(history)
        per_epochs.append(per_epoch)
        save_checkpoint(
            folder.site_checkpoint(site),
            trainer.state_dict(),
            cfg,
            mode=LOCAL,
            site=site,
            run_id=run_id,
            trained_on=_trained_on(cfg, cache),
        )
    history = _merge_histories(histories, [s.name for s in sites])
    return _result(cfg, LOCAL, sites, history, started, float(np.mean(per_epochs)))


def _trained_on(cfg: Config, cache: Any) -> dict[str, Any]:
    """What this run's checkpoints were trained on (read by the next run's ``train.init``)."""
    init = load_init(cfg)
    return trained_on(cfg, public=public_data(cache), init=init.record if init else None)


def _merge_histories(histories: list[list[dict[str, Any]]], names: list[str]) -> list[dict]:
    """Per-epoch means over sites trained one after another (local-only mode)."""
    merged = []
    for rows in zip(*histories, strict=True):
        val_sites = {n: r["val_dice"] for n, r in zip(names, rows, strict=True)}
        eps = [r["epsilon_max"] for r in rows if r["epsilon_max"] is not None]
        merged.append(
            {
                "epoch": rows[0]["epoch"],
                "train_loss": nanmean(r["train_loss"] for r in rows),
                "val_dice": nanmean(val_sites.values()),
                "val_dice_sites": val_sites,
                "epsilon_max": max(eps) if eps else None,
                "seconds": float(sum(r["seconds"] for r in rows)),
            }
        )
    return merged


def _result(
    cfg: Config,
    mode: str,
    sites: list[SiteResult],
    history: list[dict],
    started: float,
    per_epoch: float,
) -> RunResult:
    result = RunResult.of(cfg.privacy, mode, sites, history)
    result.seconds_per_epoch = per_epoch
    result.wall_seconds = time.perf_counter() - started
    return result
