"""Wide ResNet (Zagoruyko & Komodakis 2016) as MixMatch and FixMatch use it on 32 px images (google-research/
fixmatch ``libml/models.py``, ``MultiModel.classifier``): WRN-28-2 (1.47M parameters with the 10-way classifier)
and WRN-28-8.

Pre-activation blocks ``x0 + conv(lrelu(bn(conv(lrelu(bn(x0))))))``, LeakyReLU slope 0.1, BatchNorm with
TensorFlow's momentum 0.999 (PyTorch's ``momentum=0.001``) and epsilon 1e-3; a 1x1 convolution on the shortcut
where the width changes, fed the activated input only in the first block (``activate_before_residual``); a 3x3
stem of 16 channels; three groups of (depth - 4) / 6 blocks with ``16 k``, ``32 k``, ``64 k`` channels, strides
1, 2, 2; a final BN + LeakyReLU and global average pooling (the classifier is the method's). Convolutions are
initialised ``N(0, 2 / (k^2 out_channels))`` as the official code.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ssl_lightning.backbones.registry import BACKBONES
from ssl_lightning.registry import SSLError

BN_MOMENTUM, BN_EPS, LEAKY_SLOPE = 0.001, 1e-3, 0.1


def _bn_act(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM), nn.LeakyReLU(LEAKY_SLOPE))


class WideBlock(nn.Module):
    """fixmatch ``residual``: pre-activation, two 3x3 convolutions, projection shortcut where the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, activate_before_residual: bool = False) -> None:
        super().__init__()
        self.pre = _bn_act(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.mid = _bn_act(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if c_in != c_out else None
        self.activate_before_residual = activate_before_residual

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = self.pre(x0)
        if self.activate_before_residual:
            x0 = x
        x = self.conv2(self.mid(self.conv1(x)))
        return (x0 if self.shortcut is None else self.shortcut(x0)) + x


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise SSLError(f"wide_resnet depth={depth}: use depth = 6 n + 4 (28: 4 blocks per group)")
        if widen < 1:
            raise SSLError(f"wide_resnet widen={widen}: use a width factor >= 1 (2 or 8)")
        repeat, widths = (depth - 4) // 6, [16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, c_in = [], 16
        for g, c_out in enumerate(widths):
            blocks = [WideBlock(c_in, c_out, stride=2 if g else 1, activate_before_residual=g == 0)]
            blocks += [WideBlock(c_out, c_out) for _ in range(repeat - 1)]
            groups.append(nn.Sequential(*blocks))
            c_in = c_out
        self.group1, self.group2, self.group3 = groups
        self.final = _bn_act(c_in)
        self.num_features = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0]
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / (k * k * m.out_channels)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.group3(self.group2(self.group1(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


@BACKBONES.register("wide_resnet")
def wide_resnet(in_channels: int = 3, depth: int = 28, widen: int = 2) -> WideResNet:
    return WideResNet(depth, widen, in_channels)


@BACKBONES.register("wide_resnet28_2")
def wide_resnet28_2(in_channels: int = 3) -> WideResNet:
    return WideResNet(28, 2, in_channels)


@BACKBONES.register("wide_resnet28_8")
def wide_resnet28_8(in_channels: int = 3) -> WideResNet:
    return WideResNet(28, 8, in_channels)
