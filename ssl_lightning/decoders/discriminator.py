"""The context encoder's adversarial discriminator (Pathak et al. 2016, ``train.lua``'s netD; DCGAN, Radford et al.
2016): 4x4 stride-2 convolutions with LeakyReLU(0.2), BatchNorm after all but the first, doubling the width, down
to a map of at most 4x4; then one convolution over that map to a single logit (the paper's Sigmoid + BCE is
``binary_cross_entropy_with_logits`` on it). Weights N(0, 0.02), BatchNorm scales N(1, 0.02), as DCGAN's."""
from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.registry import SSLError


class DCGANDiscriminator(nn.Module):
    """``(B, in_channels, size, size)`` -> ``(B,)`` real / fake logits; ``width`` = the first layer's filters (ndf 64)."""

    def __init__(self, in_channels: int, size: int, width: int = 64) -> None:
        super().__init__()
        if size < 4:
            raise SSLError(f"DCGANDiscriminator: inputs of {size} px are too small (at least 4 px): enlarge the hole")
        layers: list[nn.Module] = []
        c_in, c_out, s = in_channels, width, size
        while s > 4:
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False))
            if layers[:-1]:  # no BatchNorm after the first convolution
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in, c_out, s = c_out, 2 * c_out, s // 2
        layers.append(nn.Conv2d(c_in, 1, s))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()
