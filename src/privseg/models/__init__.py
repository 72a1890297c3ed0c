"""DP-ready 2D segmentation networks: ``build_model(cfg.model, classes)`` -> logits
``[B, classes, R, R]``."""

from privseg.models.monet import MoNet
from privseg.models.registry import build_model, initial_model
from privseg.models.unet import UNet
from privseg.plugins import MODELS

__all__ = ["MODELS", "MoNet", "UNet", "build_model", "initial_model"]
