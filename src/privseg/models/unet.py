"""A compact 2D U-Net for DP-SGD: GroupNorm, ReLU, max-pool down, conv + up-sample up.

Three down-samplings (stride 8), widths f, 2f, 4f, 8f. Every layer has a fast Opacus per-sample
gradient (Conv2d, GroupNorm); no BatchNorm, no transposed convs, no in-place activations.
It is the demo's default model because it is cheap on CPU at 64x64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privseg.config import ModelConfig


def _conv_norm_relu(in_ch: int, out_ch: int, groups: int, k: int = 3) -> list[nn.Module]:
    # No conv bias: GroupNorm's shift makes it redundant (fewer parameters to clip and noise).
    return [
        nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(),
    ]


class DoubleConv(nn.Sequential):
    """Two conv3x3-GroupNorm-ReLU layers, optional spatial dropout after them."""

    def __init__(self, in_ch: int, out_ch: int, *, groups: int, dropout: float = 0.0) -> None:
        layers = _conv_norm_relu(in_ch, out_ch, groups) + _conv_norm_relu(out_ch, out_ch, groups)
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Up(nn.Module):
    """conv1x1-GroupNorm-ReLU halving the width, nearest x2 up-sampling, concat skip, DoubleConv.

    The 1x1 conv runs before the up-sampling: with nearest up-sampling both orders give the same
    result (GroupNorm statistics included), and this one costs a quarter. The DoubleConv's 3x3
    convs then do the spatial mixing a transposed conv would do.
    """

    def __init__(self, in_ch: int, out_ch: int, *, groups: int, dropout: float) -> None:
        super().__init__()
        self.reduce = nn.Sequential(*_conv_norm_relu(in_ch, out_ch, groups, k=1))
        self.block = DoubleConv(2 * out_ch, out_ch, groups=groups, dropout=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=2.0, mode="nearest")
        return self.block(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """``[B, in_channels, R, R]`` (R a multiple of 8) -> logits ``[B, out_channels, R, R]``."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        features: int = 16,
        groups: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        w = [features, 2 * features, 4 * features, 8 * features]
        self.enc = nn.ModuleList([DoubleConv(in_channels, w[0], groups=groups)])
        self.enc.extend(DoubleConv(w[i], w[i + 1], groups=groups) for i in range(2))
        self.bottleneck = DoubleConv(w[2], w[3], groups=groups, dropout=dropout)
        self.ups = nn.ModuleList(
            Up(w[i + 1], w[i], groups=groups, dropout=dropout) for i in reversed(range(3))
        )
        self.head = nn.Conv2d(w[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)


def build(cfg: ModelConfig, classes: int) -> UNet:
    """``model.name = "unet"`` (registered in :data:`privseg.core.plugins.MODELS`)."""
    return UNet(out_channels=classes, features=cfg.features, groups=cfg.groups, dropout=cfg.dropout)
