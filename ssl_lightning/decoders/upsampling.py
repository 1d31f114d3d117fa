"""Upsampling decoders that retrace a backbone's stages (:func:`ssl_lightning.backbones.feature_maps.stages`) in reverse.

From the chosen stage (default: the last, whose pooled map is the backbone's feature vector) each earlier stride is
reached by one resize-convolution step: nearest-neighbour upsampling to that stride's size, then 3x3 conv - BatchNorm -
ReLU to that stage's channels; a last 3x3 conv (no norm, no activation: reconstructions, logits) gives the output.

* ConvNet (:func:`convnet_decoder`): the mirror of its blocks, block4 (8w, stride 8) -> 4w -> 2w -> w -> out;
  4 convolutions as the encoder's 4.
* ResNet (:func:`resnet_decoder`): layer4 -> layer3 -> layer2 -> layer1 channels (the stem shares layer1's stride);
  below the first stage's stride (4 with the ImageNet stem, 1 with the CIFAR stem) further 2x steps halve the
  channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.backbones.feature_maps import Stage, stage as find_stage, stages
from ssl_lightning.decoders.registry import DECODERS
from ssl_lightning.registry import SSLError


def side(size: int, stride: int) -> int:
    """A feature map's side at ``stride`` for a ``size`` px input (padded strided convolutions round up)."""
    return math.ceil(size / stride)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UpsamplingDecoder(nn.Module):
    """Features of stage ``start`` -> images ``(B, out_channels, side(image_size, out_stride), ...)``.

    Args:
        start: the stage decoded from (channels, stride).
        steps: ``(channels, stride)`` of each resize-convolution step, strides decreasing, down to ``out_stride``.
        out_channels: the output's channels (image channels; 313 colour bins...).
        image_size: the input images' side, which fixes every step's output size.
        from_pooled: decode the pooled features ``(B, C)`` (the representation that kNN and the probes see) instead of
            the map: a transposed convolution from 1x1 to the stage's map size comes first (DCGAN's and the context
            encoder's first decoder layer). A map passed in is pooled first.
        out_stride: 1 = full resolution; colorization predicts at 4.
    """

    def __init__(self, start: Stage, steps: list[tuple[int, int]], out_channels: int, image_size: int,
                 from_pooled: bool = False, out_stride: int = 1) -> None:
        super().__init__()
        if out_stride > start.stride or out_stride < 1:
            raise SSLError(f"decoder: out_stride={out_stride} must be in 1..{start.stride} (stage {start.name}'s stride)")
        self.image_size, self.out_stride, self.from_pooled = image_size, out_stride, from_pooled
        self.start_side = side(image_size, start.stride)
        self.expand = None
        if from_pooled:
            self.expand = nn.Sequential(nn.ConvTranspose2d(start.channels, start.channels, self.start_side, bias=False),
                                        nn.BatchNorm2d(start.channels), nn.ReLU(inplace=True))
        self.strides = [s for _, s in steps]
        channels = [start.channels] + [c for c, _ in steps]
        self.blocks = nn.ModuleList(_conv_bn_relu(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.head = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = features
        if self.from_pooled:
            if z.ndim == 4:
                z = z.mean(dim=(2, 3))
            z = self.expand(z[:, :, None, None])
        elif z.ndim != 4:
            raise SSLError(f"this decoder takes feature maps (B, C, h, w), got {tuple(z.shape)}: build it with "
                           "from_pooled=True to decode pooled features")
        for block, stride in zip(self.blocks, self.strides):
            z = block(F.interpolate(z, size=side(self.image_size, stride), mode="nearest"))
        out = side(self.image_size, self.out_stride)
        if z.shape[-1] != out or z.shape[-2] != out:  # e.g. ConvNet's floor-pooled 3x3 map of a 28 px image
            z = F.interpolate(z, size=out, mode="nearest")
        return self.head(z)


def _plan(backbone: nn.Module, stage: str | None, out_stride: int, min_channels: int) -> tuple[Stage, list[tuple[int, int]]]:
    """The start stage and the steps: every earlier stage with a smaller stride (the earliest of a stride kept last, so
    the channels are those of the stage first reaching it), then 2x steps halving the channels down to ``out_stride``."""
    start = find_stage(backbone, stage)
    earlier = [s for s in stages(backbone) if s.stride < start.stride]
    by_stride: dict[int, int] = {}
    for s in earlier:
        by_stride.setdefault(s.stride, s.channels)
    steps = [(c, s) for s, c in sorted(by_stride.items(), reverse=True) if s >= out_stride]
    channels, stride = (steps[-1] if steps else (start.channels, start.stride))
    while stride > out_stride:
        stride //= 2
        channels = max(channels // 2, min_channels)
        steps.append((channels, max(stride, out_stride)))
    return start, steps


@DECODERS.register("convnet")
def convnet_decoder(backbone: nn.Module, out_channels: int, image_size: int, stage: str | None = None,
                    from_pooled: bool = False, out_stride: int = 1) -> UpsamplingDecoder:
    """The mirror of the small ConvNet's blocks from ``stage`` (default block4) down to ``out_stride``."""
    start, steps = _plan(backbone, stage, out_stride, min_channels=8)
    return UpsamplingDecoder(start, steps, out_channels, image_size, from_pooled, out_stride)


@DECODERS.register("resnet")
def resnet_decoder(backbone: nn.Module, out_channels: int, image_size: int, stage: str | None = None,
                   from_pooled: bool = False, out_stride: int = 1) -> UpsamplingDecoder:
    """Upsampling conv stages from ``stage`` (default layer4) with the channels of the ResNet's earlier stages."""
    start, steps = _plan(backbone, stage, out_stride, min_channels=16)
    return UpsamplingDecoder(start, steps, out_channels, image_size, from_pooled, out_stride)
