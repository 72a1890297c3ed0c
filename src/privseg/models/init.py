"""Starting a run from a checkpoint (``train.init``), and what a checkpoint was trained on.

A model's weights carry what it learnt from its training data, so a checkpoint is only as
public as its data. Trained on privseg's public phantom, it releases no patient; trained with
DP, what it released is already on its own patients' ledger (its epsilon). Trained on private
data without DP, it is not public: starting from it would pass those patients on without any
bound, so it is refused. Every checkpoint privseg writes says what it was trained on
(:func:`trained_on`, its ``extra["trained_on"]``), including the checkpoint it started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privseg.config import Config
from privseg.core.errors import ConfigError
from privseg.core.io import file_sha256, read_json
from privseg.core.run_folder import RunFolder
from privseg.models.checkpoint import read_checkpoint
from privseg.models.registry import initial_model

PUBLIC = "public"
PRIVATE = "private"


@dataclass(frozen=True)
class InitCheckpoint:
    """A checkpoint a run starts from: its weights and its record (results.json ``init``)."""

    state_dict: dict[str, torch.Tensor]
    record: dict[str, Any]


def trained_on(
    cfg: Config, *, public: dict[str, Any] | None, init: dict[str, Any] | None
) -> dict[str, Any]:
    """What a run's model was trained on: ``public`` (the verified generator record of
    privseg's public phantom) or private data, with DP or not, from which ``init`` record."""
    return {
        "data": PUBLIC if public else PRIVATE,
        "dp": bool(cfg.privacy.enabled),
        "unit": cfg.privacy.unit if cfg.privacy.enabled else None,
        "generator": public,
        "init": init,
    }


def load_init(cfg: Config) -> InitCheckpoint | None:
    """``train.init``'s weights and record; None when unset. Refused (ConfigError naming the
    field) when its model differs from this run's, or when it, or any checkpoint it started
    from, was trained on private data without DP."""
    if cfg.train.init is None:
        return None
    path = Path(cfg.train.init)
    payload = read_checkpoint(path)
    _check_model(payload, cfg, path)
    origin = origin_of(payload)
    _refuse_nonprivate(origin, path)
    extra = dict(payload.get("extra") or {})
    record = {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "run_id": extra.get("run_id"),
        "mode": extra.get("mode"),
        "trained_on": origin,
        "epsilon_max": _epsilon(RunFolder(path.parent).results, extra.get("run_id")),
    }
    return InitCheckpoint(payload["state_dict"], record)


def starting_model(cfg: Config, classes: int) -> nn.Module:
    """The model a run starts from: ``train.init``'s weights, else the seeded initial model."""
    model = initial_model(cfg.model, cfg.seed, classes)
    init = load_init(cfg)
    if init is not None:
        model.load_state_dict(init.state_dict)
    return model


def origin_of(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's :func:`trained_on`; one written before it was recorded counts as trained
    on private data, with DP as its config says."""
    origin = (payload.get("extra") or {}).get("trained_on")
    if isinstance(origin, dict):
        return origin
    privacy = dict(payload["config"].get("privacy") or {})
    dp = bool(privacy.get("enabled"))
    unit = privacy.get("unit") if dp else None
    return {"data": PRIVATE, "dp": dp, "unit": unit, "generator": None, "init": None}


def _refuse_nonprivate(origin: dict[str, Any], path: Path) -> None:
    link: dict[str, Any] | None = origin
    while link:
        if link.get("data") != PUBLIC and not link.get("dp"):
            raise ConfigError(
                f"train.init = {str(path)!r} is refused: a model trained on private data without "
                "DP is not public: its weights can reveal the patients it learnt from, with no "
                "bound, and a run started from it would pass them on. Start from a checkpoint "
                "trained with DP, or from `privseg pretrain` (privseg's public phantom)"
            )
        link = (link.get("init") or {}).get("trained_on")


def _check_model(payload: dict[str, Any], cfg: Config, path: Path) -> None:
    """The checkpoint's architecture, features, classes and resolution equal this run's."""
    data = dict(payload["config"].get("data") or {})
    model = dict(payload["config"].get("model") or {})
    theirs = {
        "model.name": model.get("name"),
        "model.features": model.get("features"),
        "model.groups": model.get("groups"),
        "data.resolution": data.get("resolution"),
        "data.classes": len(data.get("classes") or {}) or 1,
    }
    ours = {
        "model.name": cfg.model.name,
        "model.features": cfg.model.features,
        "model.groups": cfg.model.groups,
        "data.resolution": cfg.data.resolution,
        "data.classes": cfg.data.n_classes,
    }
    for name, value in ours.items():
        if theirs[name] != value:
            classes = name == "data.classes"
            what = " (number of classes)" if classes else ""
            fix = "the checkpoint's data.classes" if classes else f"{name} = {theirs[name]!r}"
            raise ConfigError(
                f"train.init = {str(path)!r} is refused: its {name}{what} = {theirs[name]!r} "
                f"differs from this run's {name} = {value!r}; a run starts from a checkpoint "
                f"of the same model: use {fix}, or another checkpoint"
            )


def _epsilon(results: Path, run_id: Any) -> Any:
    """The largest per-site epsilon of the run that wrote the checkpoint (its own results.json,
    when it lies beside it and names the same run), else None: unknown, never 0."""
    if not results.is_file() or run_id is None:
        return None
    try:
        found = read_json(results)
    except (OSError, ValueError):
        return None
    same_run = isinstance(found, dict) and found.get("run_id") == run_id
    return found.get("epsilon_max") if same_run else None
