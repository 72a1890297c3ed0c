"""MoNet (Knolle et al. 2021, PLOS ONE e0255397), the model of Ziller et al. 2021, made DP-ready.

A port of the authors' Keras ``getMoNet`` (TUM-AIMED/MoNet, ``models/MoNet.py``), layer by layer:

* every level: 3x3 conv-norm-ELU to the level's width, then an RDDC block (four 3x3 convs with
  dilation 4, 3, 2, 1; residual sums ``in + c1`` before the second and ``c2 + c3`` before the
  fourth; spatial dropout after the first three);
* two 4x4 stride-2 conv-norm-ELU down-samplings (width kept, doubled by the next level's 3x3);
* bottleneck at 4f; decoder: up-sample, concatenate the encoder features of the same level,
  3x3 conv-norm-ELU back to the level's width, RDDC;
* head: 1x1 conv to one logit map.

Changes for DP-SGD (Opacus), each for a reason:

* BatchNorm -> GroupNorm: BatchNorm mixes the samples of a batch, which breaks per-sample clipping.
* The 4x4 stride-2 *transposed* convolutions -> nearest up-sampling x2 followed by a 4x4
  stride-1 conv ("same" padding, TF-style 1 before / 2 after). Opacus has no fast per-sample
  gradient for ``ConvTranspose2d`` and its functorch fallback crashes on empty Poisson batches.
  Keeping a 4x4 kernel with the same channels keeps the parameter count of the paper.
* Head: the paper's 1x1 conv + BatchNorm + sigmoid -> 1x1 conv with bias, returning logits (the
  loss applies the sigmoid; an inference-time BatchNorm on one channel is exactly this affine map,
  a GroupNorm there would force every image's logits to the same mean and spread).
* The skip connections really concatenate (a published PyTorch port of MoNet silently drops them).

Trainable parameters at ``features=16``: 401,665 (the authors' Keras model: 401,666; the one
missing is the head's BatchNorm scale, its shift became the conv bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privseg.config import ModelConfig


class ConvNormELU(nn.Module):
    """Conv (bias-free: the norm shifts) -> GroupNorm -> ELU, the paper's ConvBnElu."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        groups: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if kernel_size % 2:
            padding = dilation * (kernel_size - 1) // 2
        elif stride == 2 and kernel_size == 4:
            padding = 1  # TF "same" for 4x4 stride 2 on even sizes: 1 on each side
        else:
            raise ValueError(f"kernel_size={kernel_size}, stride={stride} is not used by MoNet")
        self.conv = nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
        )
        self.norm = nn.GroupNorm(groups, out_ch)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class UpConvNormELU(nn.Module):
    """Nearest x2 up-sampling + 4x4 conv: stands in for the paper's 4x4 stride-2 transposed conv."""

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 4, padding=0, bias=False)
        self.norm = nn.GroupNorm(groups, channels)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.pad(x, (1, 2, 1, 2))  # TF "same" padding of an even kernel: 1 before, 2 after
        return self.act(self.norm(self.conv(x)))


class RDDC(nn.Module):
    """Repeated decreasingly dilated convolutions: dilation 4, 3, 2, 1 with two residual sums."""

    def __init__(self, channels: int, *, groups: int, dropout: float) -> None:
        super().__init__()
        self.c1 = ConvNormELU(channels, channels, groups=groups, dilation=4)
        self.c2 = ConvNormELU(channels, channels, groups=groups, dilation=3)
        self.c3 = ConvNormELU(channels, channels, groups=groups, dilation=2)
        self.c4 = ConvNormELU(channels, channels, groups=groups, dilation=1)
        # Spatial dropout (whole feature maps), as Keras SpatialDropout2D; one module per use
        # keeps the module graph honest for hooks.
        self.drop1 = nn.Dropout2d(dropout)
        self.drop2 = nn.Dropout2d(dropout)
        self.drop3 = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.drop1(self.c1(x))
        c2 = self.drop2(self.c2(x + c1))
        c3 = self.drop3(self.c3(c2))
        return self.c4(c2 + c3)


class MoNet(nn.Module):
    """Two-level MoNet on ``[B, in_channels, R, R]`` (R a multiple of 4) -> logits
    ``[B, out_channels, R, R]``.

    ``dropout`` defaults to the paper's 0.2 when the class is built directly; ``build_model``
    passes ``model.dropout`` from the config (default 0.0, so set ``model.dropout = 0.2`` to
    reproduce the paper). The paper's bottleneck always used 0.2; here one rate serves all blocks.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        features: int = 16,
        groups: int = 4,
        dropout: float = 0.2,
        depth: int = 2,
    ) -> None:
        super().__init__()
        f = features
        self.stems = nn.ModuleList()
        self.enc = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch_in = in_channels
        widths = []
        for _ in range(depth):
            self.stems.append(ConvNormELU(ch_in, f, groups=groups))
            self.enc.append(RDDC(f, groups=groups, dropout=dropout))
            self.downs.append(ConvNormELU(f, f, groups=groups, kernel_size=4, stride=2))
            widths.append(f)
            ch_in, f = f, f * 2
        self.bottleneck_stem = ConvNormELU(ch_in, f, groups=groups)
        self.bottleneck = RDDC(f, groups=groups, dropout=dropout)
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths):
            self.ups.append(UpConvNormELU(f, groups=groups))
            self.fuse.append(ConvNormELU(w + f, w, groups=groups))
            self.dec.append(RDDC(w, groups=groups, dropout=dropout))
            f = w
        self.head = nn.Conv2d(f, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stem, block, down in zip(self.stems, self.enc, self.downs, strict=True):
            x = block(stem(x))
            skips.append(x)
            x = down(x)
        x = self.bottleneck(self.bottleneck_stem(x))
        for up, fuse, block, skip in zip(
            self.ups, self.fuse, self.dec, reversed(skips), strict=True
        ):
            x = block(fuse(torch.cat([skip, up(x)], dim=1)))
        return self.head(x)


def build(cfg: ModelConfig, classes: int) -> MoNet:
    """``model.name = "monet"`` (registered in :data:`privseg.core.plugins.MODELS`)."""
    return MoNet(
        out_channels=classes, features=cfg.features, groups=cfg.groups, dropout=cfg.dropout
    )
