"""DP-ready 2D segmentation networks: ``build_model(cfg.model, classes)`` -> logits
``[B, classes, R, R]``."""

from privseg.models.monet import MoNet
from privseg.models.registry import MODELS, build_model, get_builder, initial_model
from privseg.models.unet import UNet

__all__ = ["MODELS", "MoNet", "UNet", "build_model", "get_builder", "initial_model"]
