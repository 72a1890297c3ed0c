"""DP-ready 2D segmentation networks: ``build_model(cfg.model, classes)`` -> logits
``[B, classes, R, R]``."""

from privseg.core.plugins import MODELS
from privseg.models.monet import MoNet
from privseg.models.registry import build_model, initial_model
from privseg.models.unet import UNet

__all__ = ["MODELS", "MoNet", "UNet", "build_model", "initial_model"]
