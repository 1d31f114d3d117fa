"""A fixed Sobel front end (DeepCluster's ``--sobel``, facebookresearch/deepcluster ``models/alexnet.py``):
grayscale, then the horizontal and vertical Sobel gradients, so the network cannot cluster by colour."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.registry import SSLError

_SOBEL = torch.tensor([[[[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]],
                       [[[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]]])


class SobelBackbone(nn.Module):
    """``backbone(sobel(gray(x)))``: ``gray`` the mean of the 3 channels (the official 1x1 conv with weights 1/3),
    ``sobel`` the two 3x3 gradient filters (padding 1). Both fixed (buffers, not trained). ``backbone`` takes 2
    input channels; ``num_features`` is its."""

    def __init__(self, backbone: nn.Module, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels != 3:
            raise SSLError(f"The Sobel front end turns colour images into gradients; these images have {in_channels} "
                           "channel(s): set model.init_args.sobel false for grayscale data")
        self.backbone = backbone
        self.num_features = backbone.num_features
        self.register_buffer("sobel", _SOBEL.clone())

    def front(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.mean(dim=1, keepdim=True), self.sobel.to(x.dtype), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.front(x))
