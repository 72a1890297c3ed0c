"""Model registry: config name -> builder. Unknown names fail with a "did you mean"."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
from torch import nn

from privseg.config import ModelConfig
from privseg.errors import ConfigError
from privseg.models.monet import MoNet
from privseg.models.unet import UNet

#: Channel widths of each model as multiples of ``features``; GroupNorm groups must divide them.
_WIDTH_MULTIPLES = {"unet": (1, 2, 4, 8), "monet": (1, 2, 4)}


def _unet(cfg: ModelConfig, classes: int) -> nn.Module:
    return UNet(out_channels=classes, features=cfg.features, groups=cfg.groups, dropout=cfg.dropout)


def _monet(cfg: ModelConfig, classes: int) -> nn.Module:
    return MoNet(
        out_channels=classes, features=cfg.features, groups=cfg.groups, dropout=cfg.dropout
    )


MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"unet": _unet, "monet": _monet}


def get_builder(name: str) -> Callable[[ModelConfig, int], nn.Module]:
    """Look up a builder; an unknown name raises ConfigError naming ``model.name``."""
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"model.name = {name!r} is invalid{hint}: allowed values are "
            + ", ".join(repr(k) for k in MODELS)
        ) from None


def build_model(cfg: ModelConfig, classes: int = 1) -> nn.Module:
    """Build the configured model (float32, train mode), one output channel per class.

    Validates again here because a ModelConfig can be built without ``Config.validate``.
    """
    builder = get_builder(cfg.name)
    if cfg.groups < 1 or cfg.features < 1:
        raise ConfigError(
            f"model.features = {cfg.features}, model.groups = {cfg.groups} are invalid: "
            "both must be >= 1"
        )
    for m in _WIDTH_MULTIPLES.get(cfg.name, (1,)):
        if (cfg.features * m) % cfg.groups:
            raise ConfigError(
                f"model.groups = {cfg.groups} is invalid: must divide every channel count of "
                f"{cfg.name} (model.features = {cfg.features} -> {cfg.features * m} channels)"
            )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(
            f"model.dropout = {cfg.dropout!r} is invalid: allowed values are >= 0.0 and < 1.0"
        )
    return builder(cfg, classes)


def initial_model(cfg: ModelConfig, seed: int, classes: int = 1) -> nn.Module:
    """The round-0 global model: seeded, so every site, every mode, the server and the attacker
    (who received it in round 1) hold the same weights; the caller's RNG state is untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(cfg, classes)
