"""Deep InfoMax's MI networks (rdevon/DIM ``nn_modules/mi_networks.py``): they map local feature maps and global
vectors into one space of ``mi_units`` where the scores are dot products."""
from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.heads import mlp


class MI1x1ConvNet(nn.Module):
    """``LayerNorm(conv1x1-BN-ReLU-conv1x1(x) + shortcut(x))``, the shortcut a bias-free 1x1 conv initialised as a
    noisy identity (U(-0.01, 0.01), ones on the diagonal when ``units >= channels``), LayerNorm over the channels
    at each position (``MI1x1ConvNet``). Global vectors go through it as 1x1 maps."""

    def __init__(self, channels: int, units: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(channels, units, 1, bias=False), nn.BatchNorm2d(units), nn.ReLU(inplace=True),
                                   nn.Conv2d(units, units, 1))
        self.shortcut = nn.Conv2d(channels, units, 1, bias=False)
        self.norm = nn.LayerNorm(units)
        if units >= channels:
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                self.shortcut.weight[torch.arange(channels), torch.arange(channels), 0, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x) + self.shortcut(x)
        return self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MapEncoder(nn.Module):
    """The global objective's encoder of a whole local map into one ``units`` vector: a fresh conv stage (3x3,
    stride 2, twice the channels, BN-ReLU), global average pooling, then Linear-BN-ReLU-Linear (``hidden`` ->
    ``units``). It stands for the official ``GlobalDIM``'s fresh copy of the encoder's layers after the local one
    (conv -> flatten -> fc 1024 -> linear ``mi_units``), pooled instead of flattened so that its size does not
    depend on the image size."""

    def __init__(self, channels: int, units: int, hidden: int = 1024) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * channels), nn.ReLU(inplace=True))
        self.head = mlp([2 * channels, hidden, units])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))
