"""The split-brain encoder (Zhang, Isola & Efros, CVPR 2017): two disjoint sub-networks on the two halves of a
Lab image's channels, L (1 channel) and ab (2 channels), their pooled features concatenated. Registered as a
backbone so that checkpoints, ``ssl-lightning eval`` and exports build it by name."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_lightning.backbones.registry import BACKBONES, build_backbone
from ssl_lightning.registry import SSLError


class SplitBrainEncoder(nn.Module):
    """``f(x) = [f_L(x_L), f_ab(x_ab)]`` for a 3-channel input ``[(L - 50) / 100, a / 110, b / 110]``: each half is
    a registered backbone (``half`` with ``half_kwargs``, e.g. a ConvNet of half the width) taking 1 or 2 channels."""

    def __init__(self, half: str = "convnet", half_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if half == "split_brain":
            raise SSLError("split_brain: each half must be a plain backbone (convnet, resnet18, ...), not split_brain")
        self.l_net = build_backbone(half, in_channels=1, **(half_kwargs or {}))
        self.ab_net = build_backbone(half, in_channels=2, **(half_kwargs or {}))
        self.num_features = self.l_net.num_features + self.ab_net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.l_net(x[:, :1]), self.ab_net(x[:, 1:])], dim=1)


@BACKBONES.register("split_brain")
def split_brain(in_channels: int = 3, half: str = "convnet", half_kwargs: dict[str, Any] | None = None) -> SplitBrainEncoder:
    if in_channels != 3:
        raise SSLError(f"split_brain takes Lab images (3 channels: L | ab), got in_channels={in_channels}: it needs a "
                       "colour dataset")
    return SplitBrainEncoder(half, half_kwargs)
