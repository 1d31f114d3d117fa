"""A small VGG-style ConvNet for 28-32 px images: fast enough to pretrain on a CPU."""
from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.backbones.registry import BACKBONES


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8, channels)
    if kind == "layer":  # LayerNorm over each sample's (C, H, W): no statistics shared between samples (CPC v2)
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group', 'layer' or 'none', got {kind!r}")


class ConvNet(nn.Module):
    """Four 3x3 conv blocks (conv-norm-ReLU, max-pool after the first three) and global average pooling."""

    def __init__(self, in_channels: int = 3, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


@BACKBONES.register("convnet")
def convnet(in_channels: int = 3, width: int = 32, norm: str = "batch") -> ConvNet:
    return ConvNet(in_channels=in_channels, width=width, norm=norm)
