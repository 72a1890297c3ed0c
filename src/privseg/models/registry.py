"""Building the configured model: ``model.name`` looked up in ``core.plugins.MODELS``."""

from __future__ import annotations

import torch
from torch import nn

from privseg.config import ModelConfig
from privseg.config.typed import validate
from privseg.core.plugins import MODELS


def build_model(cfg: ModelConfig, classes: int = 1) -> nn.Module:
    """Build the configured model (float32, train mode), one output channel per class.

    Validates ``cfg`` with the config's own rules (a ModelConfig can be built without
    ``Config.validate``); an unknown name raises a ConfigError with "did you mean".
    """
    validate(cfg, prefix="model.")
    model: nn.Module = MODELS.get(cfg.name)(cfg, classes)
    return model


def initial_model(cfg: ModelConfig, seed: int, classes: int = 1) -> nn.Module:
    """The round-0 global model: seeded, so every site, every mode, the server and the attacker
    (who received it in round 1) hold the same weights; the caller's RNG state is untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(cfg, classes)
