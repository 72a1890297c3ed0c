"""The one site trainer: central, local-only and federated training all run through it.

A :class:`SiteTrainer` owns one site's training split, a model, an optimizer and (with DP) the
site's :class:`~privseg.privacy.engine.SitePrivacy`. It knows nothing about Flower: the
federated client only adapts messages to :meth:`SiteTrainer.fit` / :meth:`SiteTrainer.evaluate`.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.config import Config
from privseg.core.classes import Classes, bits_to_target
from privseg.core.device import describe_device, resolve_device
from privseg.core.errors import ConfigError, DataError
from privseg.core.results import (
    CENTRAL,  # also the site name of the pooled trainer: its releases name every site's patients
)
from privseg.evaluation.evaluate import evaluate_split
from privseg.models import initial_model
from privseg.training.losses import DiceBCELoss

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
"""Called as ``callback(completed_steps, total_steps)`` during :meth:`SiteTrainer.fit`."""


class SiteTrainer:
    """Train and evaluate one model on one site's data; the same code in every mode."""

    def __init__(
        self,
        cfg: Config,
        *,
        name: str,
        train: Any,
        val: Any = None,
        test: Any = None,
        privacy: Any = None,
        planned_steps: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.train_split = train
        self.splits = {"train": train, "val": val, "test": test}
        self.privacy = privacy
        self.device = resolve_device(cfg.train.device)
        self.classes = Classes.of(cfg.data)
        cached = getattr(train, "classes", None)
        if cached is not None and cached != self.classes:
            raise DataError(
                f"site {name}: the cache's labels were prepared for classes ({cached}) but "
                f"data.classes / data.labels give ({self.classes}); prepare the cache again "
                "with this config"
            )
        # the same initial weights for every mode, site and device (built on the CPU, moved)
        self.model: nn.Module = initial_model(cfg.model, cfg.seed, len(self.classes))
        self.model.to(self.device)
        self.loss_fn = DiceBCELoss()
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.planned_steps = planned_steps
        self.steps_done = 0
        self.local_val: list[dict[str, Any]] = []  # a DP site's val curve: it stays here
        # Non-private batches follow the experiment seed (reproducible); DP batches come from
        # the privacy engine's OS-entropy sampler, never from this seed.
        self._rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
        self._batches: Iterator[np.ndarray] = iter(())
        if privacy is not None:
            path = privacy.gradient.path_on(self.device)
            log.info("site %s trains on %s (DP-SGD path %s)", name, self.describe_device(), path)
        else:
            log.info("site %s trains on %s", name, self.describe_device())

    # ---- facts ---------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        """Training slices at this site (the FedAvg weight)."""
        return len(self.train_split)

    def describe_device(self) -> str:
        """The device this trainer computes on, as results.json records it."""
        return describe_device(self.device)

    def privacy_summary(self, site: str | None = None) -> dict[str, Any] | None:
        """The privacy fields of ``site``'s data (default: this trainer's own)."""
        return self.privacy.summary(site) if self.privacy is not None else None

    # ---- training --------------------------------------------------------------------------
    def fit(
        self,
        state_dict: dict[str, torch.Tensor] | None,
        steps: int,
        *,
        run_id: str = "",
        global_state: dict[str, torch.Tensor] | None = None,
        on_step: StepCallback | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Run ``steps`` optimizer steps from ``state_dict``; return new weights and metrics.

        With DP the steps are reserved in the site's ledger *before* training starts
        (raising ``PrivacyBudgetExceeded`` if they would overspend the budget), so a crash at
        any point can only over-count the privacy spent.
        """
        if self.num_examples == 0:
            raise DataError(f"site {self.name!r} has no training slices")
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        if self.privacy is not None:
            self.privacy.reserve(steps)
        mu = self.cfg.federated.proximal_mu if global_state is not None else 0.0
        self.model.train()
        started = time.perf_counter()
        losses: list[float] = []
        for i in range(steps):
            self._set_lr()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(self._gradient_step())
            if mu > 0 and global_state is not None:
                # FedProx: the proximal gradient uses no data, so adding it after the DP noise
                # costs no privacy (a proximal loss term would be wiped out by DP-SGD).
                for pname, p in self.model.named_parameters():
                    if p.grad is not None and pname in global_state:
                        w_global = global_state[pname].to(p.device, p.dtype)
                        p.grad.add_(p.detach() - w_global, alpha=mu)
            self.optimizer.step()
            self.steps_done += 1
            if on_step is not None:
                on_step(i + 1, steps)
        seconds = time.perf_counter() - started
        metrics: dict[str, float] = {
            "train_loss": float(np.nanmean(losses)) if losses else math.nan,
            "num_examples": float(self.num_examples),
            "steps": float(steps),
            "seconds": seconds,
            "epsilon": float(self.privacy.epsilon()) if self.privacy is not None else math.nan,
        }
        return self.state_dict(), metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the weights (safe to send, save or keep while training goes
        on, whatever the training device)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def _set_lr(self) -> None:
        lr = self.cfg.train.lr
        if self.cfg.train.lr_schedule == "cosine" and self.planned_steps:
            progress = min(self.steps_done / self.planned_steps, 1.0)
            low = self.cfg.train.lr_final
            lr = low * lr + (1 - low) * lr * 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _gradient_step(self) -> float:
        split = self.train_split
        if self.privacy is not None:
            idx, groups, real = self.privacy.sample_batch()  # constant shape: padded
            images, labels = self._load(split, idx, self.device)
            stats = self.privacy.gradient(
                self.model, self.loss_fn, images, labels, torch.as_tensor(groups), real
            )
            return float(stats.get("loss", math.nan))
        idx = self._next_batch()
        images, labels = self._load(split, idx, self.device)
        # The loss is a mean of per-sample losses, so slices can pass in chunks of at most
        # train.chunk_slices with accumulated gradients: the same step, bounded memory (a
        # pooled batch of 96 MoNet slices at 256² took over 23 GiB in one pass).
        total = 0.0
        for x, y in zip(
            images.split(self.cfg.train.chunk_slices),
            labels.split(self.cfg.train.chunk_slices),
            strict=True,
        ):
            loss = self.loss_fn(self.model(x), y).sum() / len(images)
            loss.backward()
            total += float(loss.detach())
        return total

    def _next_batch(self) -> np.ndarray:
        batch = next(self._batches, None)
        if batch is None:
            order = self._rng.permutation(self.num_examples)
            bs = self.cfg.train.batch_size
            self._batches = iter([order[i : i + bs] for i in range(0, len(order), bs)])
            batch = next(self._batches)
        return batch

    def _load(
        self, split: Any, idx: np.ndarray, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_idx = idx[order]  # memory-mapped reads are faster in file order
        images = np.asarray(split.images[sorted_idx], dtype=np.float32)[inverse]
        labels = np.asarray(split.labels[sorted_idx])[inverse]  # class bit sets
        return (
            torch.from_numpy(images)[:, None].to(device),
            bits_to_target(labels, len(self.classes)).to(device),
        )

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(
        self, state_dict: dict[str, torch.Tensor] | None = None, split: str | Any = "val"
    ) -> dict[str, Any]:
        """Dice per patient volume of the given weights on a split (by name, or a split)."""
        data = self.splits.get(split) if isinstance(split, str) else split
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        if data is None:
            return {"dice": math.nan, "dice_sd": math.nan, "n_patients": 0, "patients": []}
        return evaluate_split(self.model, data, classes=self.classes.names)


def build_site_trainer(
    cfg: Config, cache_dir: Path, site: str, *, planned_steps: int, run_id: str
) -> SiteTrainer:
    """Open one site's cached splits and build its trainer (its privacy engine with DP; the
    run recorded as a release without DP otherwise)."""
    from privseg.data.cache import SliceCache

    cache = SliceCache.open(cache_dir)
    train = cache.split(site, "train")
    privacy = open_privacy(
        cfg, cache, site=site, train=train, planned_steps=planned_steps, run_id=run_id
    )
    return SiteTrainer(
        cfg,
        name=site,
        train=train,
        val=cache.split(site, "val"),
        test=cache.split(site, "test"),
        privacy=privacy,
        planned_steps=planned_steps,
    )


def training_patients(cache: Any, site: str) -> dict[str, list[str]]:
    """``{data site: content fingerprints}`` of the patients a trainer of ``site`` trains on
    (every site's for :data:`CENTRAL`)."""
    touched = list(cache.sites) if site == CENTRAL else [site]
    return {s: cache.contents(s, "train") for s in touched}


def open_privacy(
    cfg: Config, cache: Any, *, site: str, train: Any, planned_steps: int, run_id: str
) -> Any:
    """Every training run is a release on its patients, recorded in the ledger store before
    it starts: with DP, the site's DP-SGD engine (noise calibrated once for the run); without,
    a non-private release (epsilon infinite), refused on patients that hold a budget unless
    ``privacy.allow_nonprivate``. Returns the engine, or None without DP.

    The one exemption: a cache of privseg's public phantom (verified when it was prepared,
    :func:`privseg.data.public.public_data`) holds no patient, so nothing is recorded."""
    from privseg.data.public import public_data
    from privseg.privacy.engine import open_site_privacy, record_nonprivate
    from privseg.privacy.stores import open_store

    if public_data(cache) is not None:
        if cfg.privacy.enabled:
            raise ConfigError(
                f"privacy.enabled = true is invalid for {cache.root}: it is privseg's public "
                "phantom (generated, no patient), which needs no DP; set privacy.enabled = false"
            )
        log.info("site %s trains on privseg's public phantom: no patient, no ledger row", site)
        return None
    patients = training_patients(cache, site)
    ledger = open_store(cfg.privacy.ledger_dir, [p for g in patients.values() for p in g])
    if not cfg.privacy.enabled:
        record_nonprivate(
            cfg.privacy, ledger, patients, site=site, steps=planned_steps, run_id=run_id
        )
        return None
    return open_site_privacy(
        cfg,
        train,
        site=site,
        ledger=ledger,
        patients=patients,
        planned_steps=planned_steps,
        run_id=run_id,
    )
