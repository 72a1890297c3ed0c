"""`privseg run`: the paper's experiment grid on one dataset, resumable, with a report.

Each setting (central, local-only, federated, federated with DP at each epsilon, the attack)
is one ordinary training run in ``OUT/runs/<key>/``. A setting whose ``results.json`` exists
and whose config is unchanged is skipped when the study is re-run with the same ``--out``, so
an interrupted study resumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privseg import __version__
from privseg.config import Config
from privseg.config.privacy import DEFAULT_EPSILON
from privseg.core.device import describe_device, resolve_device
from privseg.core.errors import PrivsegError
from privseg.core.io import read_json, write_json
from privseg.core.progress import Progress, logged, no_progress
from privseg.core.results import (
    CENTRAL,
    FEDERATED,
    FEDERATED_DP,
    LOCAL,
    MODES,
    SETTINGS,
    RunResult,
)
from privseg.core.run_folder import RunFolder, RunInputs
from privseg.core.study_result import StudyResult, StudyRun
from privseg.data.prepare import resolve_cache
from privseg.runs import privacy as study_privacy
from privseg.runs.compute import equalise
from privseg.runs.train import machine_info, train

log = logging.getLogger(__name__)


def quick_preset(cfg: Config) -> Config:
    """A tiny grid for tests and smoke runs (about a minute on 2 cores)."""
    return cfg.replace(
        **{
            "data.resolution": 32,
            "train.epochs": 1,
            "train.batch_size": 8,
            "federated.rounds": 2,
            "federated.local_steps": 2,
            "attack.iterations": 60,
            "attack.restarts": 1,
            "attack.targets": 2,
            "attack.audit_trials": 50,
            "study.epsilons": [DEFAULT_EPSILON],
            "model.features": 8,
        }
    )


def paper_preset(cfg: Config) -> Config:
    """Ziller et al. (2021)'s setting: MoNet at 256², averaging after every batch, unweighted
    FedAvg, batch 32, the seed code's clip norm 1.2 and noise 0.38 per step, Adam 1e-3 decayed
    to 1e-4, RDP, slice-level DP, delta 1e-5. One DP setting at that noise (its epsilon is what
    the ledger computes); the attack is left to `privseg attack` (MoNet at 256² is slow to
    invert on a CPU)."""
    return cfg.replace(
        **{
            "model.name": "monet",
            "data.resolution": 256,
            "federated.local_steps": 1,
            "federated.rounds": 30,
            "federated.weighted": False,
            "federated.strategy": "fedavg",
            "train.batch_size": 32,
            "train.lr": 1e-3,
            "train.lr_final": 0.1,
            "privacy.max_grad_norm": 1.2,
            "privacy.noise_multiplier": 0.38,
            "privacy.target_epsilon": None,
            "privacy.accountant": "rdp",
            "privacy.unit": "slice",
            "privacy.delta": 1e-5,
            "study.epsilons": [],
            "study.settings": list(SETTINGS),
        }
    )


PRESETS = {"full": lambda cfg: cfg, "quick": quick_preset, "paper": paper_preset}
"""``privseg run --preset NAME``: changes applied over the user's config."""


@dataclass(frozen=True)
class Setting:
    """One cell of the grid: a training mode with or without DP at one target epsilon."""

    key: str
    label: str
    setting: str
    mode: str
    dp: bool
    epsilon: float | None = None

    def config(self, base: Config, n_sites: int) -> Config:
        """This setting's run config: DP fields, and the compute rule of ``study.compute``."""
        changes: dict[str, Any] = {"privacy.enabled": self.dp}
        if self.dp and self.epsilon is not None:  # else: the configured noise
            changes["privacy.target_epsilon"] = self.epsilon
            changes["privacy.noise_multiplier"] = None
        return equalise(base.replace(**changes), self.mode, n_sites)


def grid(cfg: Config) -> list[Setting]:
    """The settings `privseg run` executes, in order, from ``study.settings``/``epsilons``."""
    wanted = set(cfg.study.settings)
    labels = {CENTRAL: "Centralised", LOCAL: "Local only", FEDERATED: "Federated"}
    out = [Setting(m, labels[m], m, m, False) for m in MODES if m in wanted]
    if FEDERATED_DP in wanted and not cfg.study.epsilons:
        label = f"Federated DP (σ={cfg.privacy.noise_multiplier:g})"
        out.append(Setting(FEDERATED_DP, label, FEDERATED_DP, FEDERATED, True))
    if FEDERATED_DP in wanted:
        for eps in sorted(cfg.study.epsilons):
            key, label = f"{FEDERATED_DP}_eps{eps:g}", f"Federated DP (ε={eps:g})"
            out.append(Setting(key, label, FEDERATED_DP, FEDERATED, True, eps))
    return out


def run_study(
    cfg: Config,
    *,
    data: Path,
    out: Path,
    progress: Progress | None = None,
    on_setting: Callable[[str], None] | None = None,
    preset: str = "full",
) -> StudyResult:
    """Run every setting of the grid (skipping finished ones), the attack, then the report.

    ``preset`` is recorded in the results: "quick" (:func:`quick_preset`) makes the report a
    smoke test that draws no comparisons.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is invalid: allowed values are {', '.join(PRESETS)}")
    progress = logged(progress or no_progress)
    device = resolve_device(cfg.train.device)  # a GPU this machine lacks: refused before output
    folder = RunFolder(Path(out)).claim("study", inputs=[data])
    started = time.perf_counter()
    cache = resolve_cache(
        data,
        cfg,
        folder.cache,
        progress,
        accept=lambda c: folder.check_reuse(RunInputs("study", c.content_fingerprint, str(data))),
    )
    folder.admit(RunInputs("study", cache.content_fingerprint, str(data)))
    folder.write_config(cfg)
    settings = grid(cfg)
    todo = [(st, st.config(cfg, len(cache.sites))) for st in settings]
    todo = [(st.key, c) for st, c in todo if not _finished(folder.setting(st.key), c, st, cache)]
    # the attack shows the site's own slices: a release without DP, planned like the runs
    attack = [("attack", cfg.replace(**{"privacy.enabled": False}))]
    attack = attack if "attack" in cfg.study.settings else []
    plan = study_privacy.plan_grid(cfg, cache, todo + attack)  # refuses before anything runs
    runs: list[StudyRun] = []
    for i, setting in enumerate(settings, 1):
        if on_setting:
            on_setting(f"[{i}/{len(settings)}] {setting.label}")
        runs.append(_run_setting(setting, cfg, cache, folder.setting(setting.key), progress))
    attacks, audits = [], []
    if "attack" in cfg.study.settings:
        if on_setting:
            on_setting("attack: gradient inversion and audit")
        attacks, audits = _run_attack(cfg, cache, folder, progress)
    study = StudyResult(
        preset=preset,
        privseg_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={"device": describe_device(device), **machine_info()},
        data=_data_summary(cache, data, cfg),
        config=cfg.to_dict(),
        wall_seconds=time.perf_counter() - started,
        runs=runs,
        attack=attacks,
        audit=audits,
        privacy={"plan": plan, "spent": study_privacy.spent(cfg, cache)},
    )
    from privseg.report.render import write_report

    write_report(study.write(folder.results), folder.root)
    return study


def _run_setting(
    setting: Setting, base: Config, cache: Any, run: RunFolder, progress: Progress
) -> StudyRun:
    cfg = setting.config(base, len(cache.sites))
    if _finished(run, cfg, setting, cache):
        log.info("skipping %s: %s exists with the same config", setting.key, run.results)
    else:
        # a federated setting an interrupted study left after some rounds is finished, not
        # started over (that would spend the sites' privacy again)
        resume = run.federated_state.is_file() and not run.results.is_file()
        if resume:
            log.info("resuming %s after its last saved round", setting.key)
        train(
            cfg,
            data=Path(cache.root),
            out=run.root,
            mode=setting.mode,  # type: ignore[arg-type]
            progress=progress,
            resume=resume,
        )
    result = RunResult.load(run.results)
    result.target_epsilon = setting.epsilon
    return StudyRun(setting.setting, setting.label, str(run.root), result)


def _finished(run: RunFolder, cfg: Config, setting: Setting, cache: Any) -> bool:
    """A finished setting is reused only if it ran with exactly this configuration, mode and
    data (else it is trained again, and :meth:`RunFolder.admit` refuses other inputs)."""
    if not run.results.is_file():
        return False
    try:
        recorded = run.recorded_inputs()
        wanted = RunInputs(setting.mode, cache.content_fingerprint)
        return recorded is not None and recorded.matches(wanted) and run.load_config() == cfg
    except PrivsegError:
        return False


def _run_attack(
    cfg: Config, cache: Any, study: RunFolder, progress: Progress
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Attack one site's update without DP and with DP at the largest study epsilon."""
    from privseg.runs.attack import run_attack_study

    done = study.attack_results
    if done.is_file():
        saved = read_json(done)
        if saved.get("config") == cfg.to_dict():
            return saved["attack"], saved["audit"]
    checkpoint = study.setting(FEDERATED).checkpoint
    attacks, audits = run_attack_study(
        cfg,
        cache=cache,
        checkpoint=checkpoint if checkpoint.is_file() else None,
        out_dir=study.attack,
        epsilons=[None, *([max(cfg.study.epsilons)] if cfg.study.epsilons else [])],
        progress=progress,
        relative_to=study.root,
    )
    write_json(done, {"attack": attacks, "audit": audits, "config": cfg.to_dict()})
    return attacks, audits


def _data_summary(cache: Any, data: Path, cfg: Config) -> dict[str, Any]:
    sites = []
    for s in cache.sites:
        splits = {k: cache.split(s, k) for k in ("train", "val", "test")}
        sites.append(
            {
                "name": s,
                "n_train": len(splits["train"]),
                "n_val": len(splits["val"]),
                "n_test": len(splits["test"]),
                "patients_train": len(set(splits["train"].patient.tolist())),
                "patients_test": len(set(splits["test"].patient.tolist())),
            }
        )
    return {
        "source": str(data),
        "cache_dir": str(cache.root),
        "sites": sites,
        "resolution": cfg.data.resolution,
    }
