"""Per-sample segmentation loss for DP-SGD.

DP-SGD clips each sample's gradient, which bounds one record's influence only if that sample's
loss depends on that sample alone. So every term here is reduced per sample, never over the batch
(unlike MONAI ``DiceLoss(batch=True)``); the caller takes the mean of the ``[B]`` vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiceBCELoss(nn.Module):
    """``dice_weight * (1 - soft Dice) + bce_weight * mean BCE``, one value per sample.

    ``forward(logits [B,C,H,W], target [B,C,H,W]) -> [B]``, C the classes (sigmoid each, they
    may overlap). Soft Dice uses ``sigmoid(logits)`` over the sample's own pixels, per class,
    then the mean over classes; ``smooth`` keeps it defined (and ~0 loss) on empty slices
    predicted empty. With C = 1 this is the paper's binary loss.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        for name, value in (("dice_weight", dice_weight), ("bce_weight", bce_weight)):
            if not value >= 0:
                raise ValueError(f"{name} = {value!r} is invalid: must be >= 0")
        if not smooth > 0:
            raise ValueError(f"smooth = {smooth!r} is invalid: must be > 0")
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the "
                "same shape [B, C, H, W]"
            )
        target = target.to(logits.dtype)
        pixels = tuple(range(2, logits.dim()))
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum(pixels)
        denom = prob.sum(pixels) + target.sum(pixels)
        dice = ((2.0 * inter + self.smooth) / (denom + self.smooth)).mean(1)  # [B, C] -> [B]
        dims = tuple(range(1, logits.dim()))
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
        return self.dice_weight * (1.0 - dice) + self.bce_weight * bce
