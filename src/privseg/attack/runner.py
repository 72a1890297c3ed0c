"""Run the gradient-inversion attack and the audit on a trained model; write the results.

The runner is the only place that holds both the private slices and the attacker: it plays
the site (``simulate_site_update``), hands the server's view to the attacker (``reconstruct``),
and scores the result against the truth afterwards (``metrics.score``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.attack import metrics
from privseg.attack.audit import audit_model
from privseg.attack.inversion import default_loss, reconstruct, simulate_site_update
from privseg.attack.threat import ThreatModel
from privseg.config import Config
from privseg.config.privacy import DEFAULT_EPSILON
from privseg.core.classes import bits_to_target
from privseg.core.errors import DataError
from privseg.core.io import atomic_write_bytes, write_json
from privseg.core.progress import Progress, no_progress
from privseg.core.results import FEDERATED, RunResult
from privseg.core.run_folder import ATTACK_JSON, ATTACK_PNG
from privseg.privacy.plan import DPPlan, count_units, expected_batch_size, unit_ids
from privseg.report.figures import reconstruction_grid_png

log = logging.getLogger(__name__)

GALLERY_OTHERS = 15
CHANCE_SLICES = 8


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX form), or absolute when it is not under ``base``."""
    path, base = Path(path).resolve(), Path(base).resolve()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


# ---- DP setting of a site -----------------------------------------------------------------
def dp_plan(
    cfg: Config,
    split: Any,
    *,
    epsilon: float | None = None,
    run: RunResult | None = None,
    site: str = "",
) -> DPPlan:
    """The DP-SGD plan of ``site`` attacked on its training ``split``: the run's own (its
    results' site entry) when it was private and no other ``epsilon`` is asked for, else the
    site's plan for ``epsilon`` (default ``privacy.target_epsilon``) with the run's steps when
    it recorded them (federated calibration without a run)."""
    entry = run.site(site) if run is not None else None
    recorded = (entry.privacy if entry else None) or {}
    if epsilon is None and recorded.get("noise_multiplier"):
        n_units = count_units(unit_ids(split, recorded["unit"]))
        return DPPlan(
            noise_multiplier=recorded["noise_multiplier"],
            sample_rate=recorded["sample_rate"],
            steps=recorded["steps"],
            max_grad_norm=recorded["max_grad_norm"],
            delta=recorded["delta"],
            unit=recorded["unit"],
            accountant=recorded["accountant"],
            n_units=n_units,
            expected_batch_size=expected_batch_size(cfg.train.batch_size, n_units),
            target_epsilon=run.target_epsilon if run is not None else None,
        )
    return DPPlan.for_split(
        cfg,
        split,
        federated=run is None or run.mode == FEDERATED,
        steps=recorded.get("steps"),
        target_epsilon=epsilon
        if epsilon is not None
        else cfg.privacy.target_epsilon or DEFAULT_EPSILON,
    )


# ---- the attack on a model and a site's slices ---------------------------------------------
def _pick_targets(n: int, targets: int, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    need = targets * batch
    if n < need + 1:
        raise DataError(
            f"the site has {n} training slices; the attack needs more than "
            f"{need} ({targets} targets x batch {batch})"
        )
    order = rng.permutation(n)[:need]
    return [order[i * batch : (i + 1) * batch] for i in range(targets)]


def _others(
    i: int, patients: np.ndarray | None, n: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """``k`` slices of other patients than slice ``i``'s (other slices when none are known)."""
    if patients is not None:
        pool = np.flatnonzero(patients != patients[i])
        if len(pool) == 0:
            pool = np.setdiff1d(np.arange(n), [i])
    else:
        pool = np.setdiff1d(np.arange(n), [i])
    return rng.choice(pool, size=min(k, len(pool)), replace=False)


def run_attack_on_model(
    model: nn.Module,
    images: Any,
    labels: Any,
    *,
    threat: ThreatModel | None = None,
    cfg: Config,
    dp: DPPlan | None = None,
    patients: Any = None,
    seed: int | None = None,
    loss_fn: nn.Module | None = None,
    out_dir: Path | None = None,
    progress: Progress | None = None,
    label: str = "",
    device: str | torch.device = "cpu",
    meta: dict[str, Any] | None = None,
    relative_to: Path | None = None,
) -> dict[str, Any]:
    """Attack ``cfg.attack.targets`` batches drawn from ``images``/``labels`` (a site's training
    slices ``[N, R, R]``) and score them; ``dp`` (see :func:`dp_plan`) makes it T3.

    With ``out_dir``, writes ``attack.png`` (the reconstruction grid) and ``attack.json``
    (``meta`` merged in) there; the result's ``grid_png`` is the PNG's path relative to
    ``relative_to`` (the run or study folder whose report shows it; default ``out_dir``).
    Seeded by ``seed`` (default ``cfg.seed``): target choice, the attacker's initial dummies,
    the site's DP noise (the real ``DPGradient``). ``device`` runs victim and
    attacker there (the random draws stay on the CPU: a seed gives the same targets and dummies
    on any device).
    """
    device = torch.device(device)
    if next(model.parameters()).device != device:
        model = copy.deepcopy(model).to(device)
    progress = progress or no_progress
    seed = cfg.seed if seed is None else seed
    loss_fn = loss_fn if loss_fn is not None else default_loss()
    x_all = torch.as_tensor(np.asarray(images, dtype=np.float32))
    y_all = bits_to_target(labels, cfg.data.n_classes)  # [N, C, R, R], C = data.classes
    pats = None if patients is None else np.asarray(patients)
    n = len(x_all)
    if threat is None:
        threat = ThreatModel.from_config(cfg, dp=dp, num_samples=cfg.attack.batch_size)
    if threat.resolution != x_all.shape[-1]:
        threat = ThreatModel(**{**_fields(threat), "resolution": int(x_all.shape[-1])})
    rng = np.random.default_rng([seed, 7])
    batches = _pick_targets(n, cfg.attack.targets, threat.batch_size, rng)
    victim_gen = torch.Generator().manual_seed(seed + 1)
    attacker_gen = torch.Generator().manual_seed(seed + 2)
    rows: list[dict[str, Any]] = []
    shown: list[tuple[np.ndarray, np.ndarray]] = []
    started = time.perf_counter()
    victim = _Victim(model, loss_fn, victim_gen, device)
    for t, idx in enumerate(batches):

        def on_iteration(i: int, n: int, t: int = t) -> None:
            progress(f"attack{label}: target {t + 1}/{len(batches)}", t * n + i, len(batches) * n)

        scored, pairs = _attack_batch(
            victim, threat, cfg, (x_all, y_all, pats), idx, attacker_gen, rng, on_iteration
        )
        for row in scored:
            row["batch"] = t
        rows.extend(scored)
        shown.extend(pairs)
    progress(f"attack{label}: done", len(batches), len(batches))
    summary = metrics.summarise(rows)
    result: dict[str, Any] = {
        "threat": threat.threat,
        "dp": threat.dp,
        "epsilon": threat.epsilon if threat.dp else None,
        "noise_multiplier": threat.noise_multiplier,
        "batch_size": threat.batch_size,
        "mask_mode": threat.mask,
        "local_steps": threat.local_steps,
        "round": cfg.attack.round,
        **summary,
        "iterations": cfg.attack.iterations,
        "restarts": cfg.attack.restarts,
        "attack_lr": cfg.attack.lr,
        "tv_weight": cfg.attack.tv_weight,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "threat_model": threat.to_dict(),
        "dp_plan": None if dp is None else dataclasses.asdict(dp),
        **(meta or {}),
        "targets": rows,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        png = out_dir / ATTACK_PNG
        atomic_write_bytes(png, reconstruction_grid_png(shown, result))
        result["grid_png"] = relative_path(png, relative_to if relative_to else out_dir)
        write_json(out_dir / ATTACK_JSON, result)
    return result


@dataclasses.dataclass(frozen=True)
class _Victim:
    """The site whose update is attacked: its model and loss, its noise, where it computes."""

    model: nn.Module
    loss_fn: nn.Module
    generator: torch.Generator
    device: torch.device


def _attack_batch(
    victim: _Victim,
    threat: ThreatModel,
    cfg: Config,
    data: tuple[torch.Tensor, torch.Tensor, np.ndarray | None],
    idx: np.ndarray,
    attacker_gen: torch.Generator,
    rng: np.random.Generator,
    on_iteration: Callable[[int, int], None],
) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, np.ndarray]]]:
    """One target batch: the site's update, the attacker's reconstruction, every slice scored
    against the truth, a chance baseline and a gallery of other slices; (rows, shown pairs)."""
    x_all, y_all, pats = data
    n, device = len(x_all), victim.device
    x, y = x_all[idx][:, None], y_all[idx]
    payload = simulate_site_update(
        victim.model, x.to(device), y.to(device), threat, loss_fn=victim.loss_fn,
        generator=victim.generator,
    )  # fmt: skip
    rec = reconstruct(
        payload,
        threat,
        cfg.attack,
        mask=y.to(device) if threat.mask == "given" else None,
        generator=attacker_gen,
        on_iteration=on_iteration,
    )
    rec.images, rec.masks, rec.prior = rec.images.cpu(), rec.masks.cpu(), rec.prior.cpu()
    chance = [x_all[_others(int(i), pats, n, CHANCE_SLICES, rng)] for i in idx]
    galleries = []
    for i in idx:
        others = _others(int(i), pats, n, GALLERY_OTHERS, rng)
        galleries.append((0, torch.cat([x_all[int(i)][None], x_all[others]])))
    scored = metrics.score(
        rec.images,
        x,
        prior=rec.prior,
        chance=chance,
        galleries=galleries,
        recon_masks=rec.masks if threat.mask != "given" else None,
        target_masks=y if threat.mask != "given" else None,
        matching_loss=rec.matching_loss,
    )
    for row, i in zip(scored, idx, strict=True):
        row.update(
            {
                "slice_index": int(i),
                "patient": None if pats is None else int(pats[int(i)]),
                "restart_losses": rec.restart_losses,
            }
        )
    perm = metrics.match(rec.images, x)
    shown = [(x[b, 0].numpy(), rec.images[int(perm[b]), 0].numpy()) for b in range(len(idx))]
    return scored, shown


def _fields(threat: ThreatModel) -> dict[str, Any]:
    return {f.name: getattr(threat, f.name) for f in dataclasses.fields(threat)}


def attacked_model(cfg: Config, final: nn.Module | None) -> tuple[nn.Module, str]:
    """The global model the attacked update is computed on (``cfg.attack.round``) and what it
    is: the run's ``final`` model, or the initial one the server broadcast in round 1 (rebuilt
    from the run's seed exactly as training built it)."""
    from privseg.models.init import starting_model

    if cfg.attack.round == "first" or final is None:
        model = starting_model(cfg, cfg.data.n_classes).eval()
        return model, f"round 1: the initial global model (seed {cfg.seed})"
    return final, "the run's final global model"


def audit_setting(
    model: nn.Module,
    split: Any,
    cfg: Config,
    dp: DPPlan | None,
    *,
    trials: int | None = None,
    candidates: int | None = None,
) -> dict[str, Any]:
    """The identification audit of one DP setting (``cfg.attack`` trials and candidates);
    without ``dp``, the clipped step without noise."""
    return audit_model(
        model,
        split.images,
        bits_to_target(split.labels, cfg.data.n_classes),
        max_grad_norm=dp.max_grad_norm if dp else cfg.privacy.max_grad_norm,
        noise_multiplier=dp.noise_multiplier if dp else 0.0,
        epsilon=dp.stated_epsilon() if dp else None,
        delta=dp.delta if dp else cfg.privacy.delta,
        trials=trials or cfg.attack.audit_trials,
        candidates=candidates or cfg.attack.audit_candidates,
        seed=cfg.seed,
        sample_rate=dp.sample_rate if dp else None,
        steps=dp.steps if dp else None,
    )


def setting_key(dp: DPPlan | None) -> str:
    """A study attack's name: ``no_dp``, or ``dp_eps<E>`` for the epsilon its noise is for."""
    return "no_dp" if dp is None else f"dp_eps{dp.stated_epsilon():g}"


def attack_split(
    model: nn.Module, split: Any, cfg: Config, dp: DPPlan | None, **options: Any
) -> dict[str, Any]:
    """:func:`run_attack_on_model` on a site's split: its slices, labels and patients."""
    return run_attack_on_model(
        model, split.images, split.labels, cfg=cfg, dp=dp, patients=split.patient, **options
    )


def attack_setting(
    model: nn.Module,
    split: Any,
    cfg: Config,
    dp: DPPlan | None,
    *,
    out_dir: Path | None = None,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
    relative_to: Path | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """One setting of the study's attack on a site's training ``split``: no DP (``dp`` None)
    or the site's DP-SGD plan (:func:`dp_plan`). The result names it (``setting``, see
    :func:`setting_key`) and carries the plan; with ``out_dir``, files go to
    ``out_dir/<setting>/`` (``grid_png`` relative to ``relative_to``; ``device``, see
    :func:`run_attack_on_model`)."""
    key = setting_key(dp)
    return attack_split(
        model,
        split,
        cfg,
        dp,
        out_dir=None if out_dir is None else Path(out_dir) / key,
        progress=progress,
        label=f" ({key})",
        meta={"setting": key, **(meta or {})},
        relative_to=relative_to,
        device=device,
    )
