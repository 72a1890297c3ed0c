"""Model checkpoints that carry their own config, so ``predict`` needs nothing else.

A checkpoint is a plain dict saved with ``torch.save`` (atomically) and read back with
``torch.load(weights_only=True)``: it holds only tensors, str, numbers, lists and dicts, so
loading a file never runs pickled code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.config import Config
from privseg.core.errors import CheckpointError, PrivsegError
from privseg.core.io import atomic_torch_save
from privseg.models.registry import build_model

FORMAT = "privseg-checkpoint/1"
_OPACUS_PREFIX = "_module."


def _plain(value: Any, name: str) -> Any:
    """Convert ``extra`` values to types ``weights_only`` loading accepts, or fail naming them."""
    if isinstance(value, np.generic):  # before float: np.float64 subclasses float
        return value.item()
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"checkpoint extra {name} has type {type(value).__name__}, which cannot be "
        "stored safely; use numbers, strings, lists, dicts or tensors"
    )


def save_checkpoint(
    path: str | Path, state_dict: dict[str, torch.Tensor], cfg: Config, **extra: Any
) -> Path:
    """Write ``{"format", "model", "data", "config", "state_dict", "extra"}`` atomically.

    Opacus's ``_module.`` key prefix is removed so the file loads into a bare model.
    """
    path = Path(path)
    keys = list(state_dict)
    if keys and all(k.startswith(_OPACUS_PREFIX) for k in keys):
        state_dict = {k[len(_OPACUS_PREFIX) :]: v for k, v in state_dict.items()}
    payload = {
        "format": FORMAT,
        "model": dataclasses.asdict(cfg.model),
        "data": {
            "resolution": cfg.data.resolution,
            "hu_window": list(cfg.data.hu_window),
            "labels": list(cfg.data.labels),
        },
        "config": cfg.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "extra": {k: _plain(v, k) for k, v in extra.items()},
    }
    atomic_torch_save(payload, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked for format; errors are CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, foreign pickle, unsafe types: all "not ours"
        raise CheckpointError(
            f"{path} is not a privseg checkpoint (could not be read: {type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path} is not a privseg checkpoint (no 'format' entry)")
    if payload["format"] != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format']!r}; this privseg reads {FORMAT!r}"
        )
    missing = [k for k in ("config", "state_dict") if not isinstance(payload.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path} is an incomplete privseg checkpoint (no {missing[0]!r})")
    return payload


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the model from the stored config and load its weights; returns it in eval mode
    on ``device`` (a resolved torch device; the file's tensors are read onto the CPU, so a
    checkpoint saved anywhere loads anywhere)."""
    payload = read_checkpoint(path)
    try:
        cfg = Config.from_dict(payload["config"])
        model = build_model(cfg.model, cfg.data.n_classes)
    except PrivsegError as exc:
        raise CheckpointError(f"{path} holds an invalid config: {exc}") from exc
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"{path} does not match model {cfg.model.name!r} "
            f"(features={cfg.model.features}): {detail}"
        ) from exc
    model.to(device).eval()
    return model, cfg, dict(payload.get("extra") or {})
