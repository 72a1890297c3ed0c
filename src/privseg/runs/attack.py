"""Attack and audit runs: read a run folder, attack one site's update, write the results.

The library (:mod:`privseg.attack`) attacks a model on slices; this module adds what a run
needs around it: the run's model, config, results and the site's slices from its folder, and
the study's attack of every setting.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from privseg.attack.runner import (
    attack_setting,
    attack_split,
    attacked_model,
    audit_setting,
    dp_plan,
    setting_key,
)
from privseg.config import Config
from privseg.config.typed import apply_override
from privseg.core.device import resolve_device
from privseg.core.errors import DataError
from privseg.core.io import write_json
from privseg.core.output import claimed_folder
from privseg.core.progress import Progress
from privseg.core.results import RunResult
from privseg.core.run_folder import ATTACK_JSON, ATTACK_PNG, AUDIT_JSON, RunFolder
from privseg.data.cache import SliceCache, SliceSplit
from privseg.models.checkpoint import load_checkpoint


def record_attack(cfg: Config, cache: SliceCache, site: str, what: str) -> None:
    """An attack or audit writes the site's own training slices (and what was reconstructed
    from them) into its folder: a release without DP on those patients, recorded as epsilon
    infinite, and refused on patients under a budget unless ``privacy.allow_nonprivate``."""
    from privseg.privacy.engine import record_nonprivate
    from privseg.privacy.stores import open_store

    patients = {site: cache.contents(site, "train")}
    ledger = open_store(cfg.privacy.ledger_dir, patients[site])
    record_nonprivate(cfg.privacy, ledger, patients, site=site, steps=1, run_id=what)


def load_run(run_dir: Path, site: str) -> tuple[nn.Module, Config, RunResult, SliceSplit]:
    """A run folder's global model, config, results and ``site``'s training split."""
    run = RunFolder(run_dir)
    results = run.load_results()
    cfg = run.load_config()
    model = load_checkpoint(run.checkpoint)[0]
    cache = _cache_of(run, results)
    cache_dir = cache.root
    recorded = run.recorded_inputs()
    if recorded is not None and recorded.data not in (None, cache.content_fingerprint):
        raise DataError(
            f"{cache_dir} no longer holds the data {run.root} was trained on (content "
            f"{recorded.data[:12]}, now {cache.content_fingerprint[:12]}): attacking or "
            "auditing its model on other slices would report on the wrong patients"
        )
    if site not in cache.sites:
        raise DataError(f"site {site!r} is not in {cache_dir}; sites: {', '.join(cache.sites)}")
    return model, cfg, results, cache.split(site, "train")


def _cache_of(run: RunFolder, results: RunResult) -> SliceCache:
    if results.cache_dir is None:
        raise DataError(f"{run.results} has no 'cache_dir': cannot find the site's slices")
    return SliceCache.open(results.cache_dir)


@contextmanager
def _attack_folder(
    run_dir: Path, results: RunResult, names: Iterable[str], *, overwrite: bool
) -> Iterator[Path]:
    """``RUN_DIR/attack``, claimed for writing ``names`` (refused when it is a folder privseg
    did not create, unless ``overwrite``; even then none of its own files is replaced)."""
    inputs = [results.cache_dir] if results.cache_dir else []
    folder = RunFolder(run_dir).attack
    with claimed_folder(folder, "attack", inputs=inputs, overwrite=overwrite) as claim:
        claim.own(names)
        yield folder


def run_attack(
    run_dir: Path,
    *,
    site: str,
    threat: str | None = None,
    batch_size: int | None = None,
    iterations: int | None = None,
    restarts: int | None = None,
    mask: str | None = None,
    targets: int | None = None,
    epsilon: float | None = None,
    overrides: list[str] | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Attack ``site``'s update in a finished run; write ``RUN_DIR/attack/`` (result + PNG).

    ``epsilon`` (or ``threat="T3"``) attacks the DP version: the run's own noise when it was
    private, else sigma calibrated for ``epsilon`` at the run's sample rate and steps.
    ``device`` ("auto", "cpu", "cuda", "cuda:N") runs victim and attacker there: this
    machine's, not the run's ``train.device`` (the run may have trained elsewhere).
    """
    target = resolve_device(device, field="device")  # a GPU this machine lacks: refused first
    model, cfg, results, split = load_run(run_dir, site)
    changes = {
        "attack.threat": threat,
        "attack.batch_size": batch_size,
        "attack.iterations": iterations,
        "attack.restarts": restarts,
        "attack.mask": mask,
        "attack.targets": targets,
    }
    cfg = cfg.replace(**{k: v for k, v in changes.items() if v is not None})
    if overrides:
        raw = cfg.to_dict()
        for item in overrides:
            apply_override(raw, item)
        cfg = Config.from_dict(raw)
    record_attack(cfg, _cache_of(RunFolder(run_dir), results), site, f"attack of {run_dir}")
    model, weights = attacked_model(cfg, model)
    dp = None
    if cfg.attack.threat == "T3" or epsilon is not None:
        dp = dp_plan(cfg, split, epsilon=epsilon, run=results, site=site)
    with _attack_folder(
        run_dir, results, [ATTACK_JSON, ATTACK_PNG], overwrite=overwrite
    ) as out_dir:
        return attack_split(
            model,
            split,
            cfg,
            dp,
            out_dir=out_dir,
            progress=progress,
            meta={"site": site, "weights": weights},
            relative_to=Path(run_dir),
            device=target,
        )


def run_audit(
    run_dir: Path,
    *,
    site: str,
    trials: int | None = None,
    candidates: int | None = None,
    epsilon: float | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The K-way identification audit on ``site``; writes its result into ``RUN_DIR/attack/``.

    The run's own DP noise when it was private (or sigma for ``epsilon``); a non-private run
    is audited without noise (reported epsilon = infinity, bound 1).
    """
    model, cfg, results, split = load_run(run_dir, site)
    record_attack(cfg, _cache_of(RunFolder(run_dir), results), site, f"audit of {run_dir}")
    model, weights = attacked_model(cfg, model)
    entry = results.site(site)
    dp = None
    if epsilon is not None or (entry and entry.privacy and entry.privacy.get("noise_multiplier")):
        dp = dp_plan(cfg, split, epsilon=epsilon, run=results, site=site)
    with _attack_folder(run_dir, results, [AUDIT_JSON], overwrite=overwrite) as out_dir:
        result = audit_setting(model, split, cfg, dp, trials=trials, candidates=candidates)
        result.update({"site": site, "weights": weights})
        write_json(out_dir / AUDIT_JSON, result)
    return result


def run_attack_study(
    cfg: Config,
    *,
    cache: Any,
    checkpoint: Path | None,
    out_dir: Path,
    epsilons: list[float | None],
    site: str | None = None,
    progress: Progress | None = None,
    relative_to: Path | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The study's attack: one site's update without DP (``None``) and with DP-SGD at each
    epsilon (sigma calibrated for the federated setting); an audit for each. Writes
    ``out_dir/<setting>/`` (attack result, grid and audit); each result's ``grid_png`` is
    relative to ``relative_to`` (the study folder; default ``out_dir/<setting>``). The attacks
    run on ``train.device``; the audits (one-slice steps) on the CPU."""
    device = resolve_device(cfg.train.device)
    site = site or cache.sites[0]
    record_attack(cfg, cache, site, f"study attack into {out_dir}")
    split = cache.split(site, "train")
    final = load_checkpoint(checkpoint)[0] if checkpoint is not None else None
    model, weights = attacked_model(cfg, final)
    if cfg.attack.threat == "T3":
        cfg = cfg.replace(**{"attack.threat": "T1"})
    attacks, audits = [], []
    for eps in epsilons:
        meta = {"site": site, "weights": weights}
        dp = None if eps is None else dp_plan(cfg, split, epsilon=eps)
        res = attack_setting(
            model,
            split,
            cfg,
            dp,
            out_dir=out_dir,
            progress=progress,
            meta=meta,
            relative_to=relative_to,
            device=device,
        )
        aud = audit_setting(model, split, cfg, dp)
        aud.update({"site": site, "setting": setting_key(dp)})
        write_json(Path(out_dir) / setting_key(dp) / AUDIT_JSON, aud)
        attacks.append(res)
        audits.append(aud)
    return attacks, audits
