"""Intermediate feature maps of the registered backbones, beside their pooled ``forward``.

Methods that score or decode spatial positions (Deep InfoMax, CPC, the autoencoders, dense colorization) call::

    maps = feature_maps(backbone, x)             # {"block1": (B, C1, H, W), ..., "block4": (B, C4, H/8, W/8)}
    fmap = forward_features(backbone, x)         # the last map; pool(fmap) == backbone(x)
    stages(backbone)                             # [Stage("block1", channels=32, stride=1), ...]

The backbones themselves are untouched (same modules, same state-dict keys), so probes, checkpoints and the
exported weights stay as they were. Stage names: ConvNet ``block1``-``block4`` (each after its ReLU, before the
pool); ResNet ``stem`` (after the max-pool, or the 3x3 CIFAR stem) and ``layer1``-``layer4``; Wide ResNet ``stem``
and ``group1``-``group3`` (the last with the final BN + LeakyReLU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torchvision.models import ResNet

from ssl_lightning.backbones.convnet import ConvNet
from ssl_lightning.backbones.wide_resnet import WideResNet
from ssl_lightning.registry import SSLError


@dataclass(frozen=True)
class Stage:
    """A named intermediate output: its channel count and its stride relative to the input."""

    name: str
    channels: int
    stride: int


def _convnet_blocks(net: ConvNet) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """(name, conv-norm-ReLU block, the pool that follows it or None) for each of the four blocks."""
    layers = list(net.features)
    i, block = 0, 1
    while i < len(layers):
        body = nn.Sequential(*layers[i:i + 3])
        pool = layers[i + 3] if i + 3 < len(layers) and isinstance(layers[i + 3], nn.MaxPool2d) else None
        yield f"block{block}", body, pool
        i += 4 if pool is not None else 3
        block += 1


def _resnet_stages(net: ResNet) -> Iterator[tuple[str, nn.Module]]:
    yield "stem", nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        yield name, getattr(net, name)


def _wide_resnet_stages(net: WideResNet) -> Iterator[tuple[str, nn.Module]]:
    yield "stem", net.stem
    yield "group1", net.group1
    yield "group2", net.group2
    yield "group3", nn.Sequential(net.group3, net.final)  # with the final BN + LeakyReLU: pool(map) == forward


def _unsupported(backbone: nn.Module) -> SSLError:
    return SSLError(f"{type(backbone).__name__} has no feature-map access: methods that use spatial features "
                    "(Deep InfoMax, CPC, autoencoders, colorization) take the 'convnet' or a 'resnet*' backbone")


def feature_maps(backbone: nn.Module, x: torch.Tensor, upto: str | None = None) -> dict[str, torch.Tensor]:
    """Every stage's output in order, stopping after ``upto`` (default: the last stage)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(backbone, ConvNet):
        for name, body, pool in _convnet_blocks(backbone):
            x = body(x)
            out[name] = x
            if name == upto:
                return out
            if pool is not None:
                x = pool(x)
    elif isinstance(backbone, (ResNet, WideResNet)):
        for name, module in (_resnet_stages if isinstance(backbone, ResNet) else _wide_resnet_stages)(backbone):
            x = module(x)
            out[name] = x
            if name == upto:
                return out
    else:
        raise _unsupported(backbone)
    if upto is not None:
        raise SSLError(f"{type(backbone).__name__} has no stage {upto!r}; its stages are {list(out)}")
    return out


def forward_features(backbone: nn.Module, x: torch.Tensor, stage: str | None = None) -> torch.Tensor:
    """One stage's feature map (default: the last, whose spatial mean is the pooled ``backbone(x)``)."""
    maps = feature_maps(backbone, x, upto=stage)
    return maps[stage] if stage is not None else next(reversed(maps.values()))


def pool(fmap: torch.Tensor) -> torch.Tensor:
    """Global average pooling, as every registered backbone's ``forward`` ends."""
    return fmap.mean(dim=(2, 3))


def stages(backbone: nn.Module) -> list[Stage]:
    """Name, channels and stride of every stage, read from the modules (no forward pass)."""
    if isinstance(backbone, ConvNet):
        result, stride = [], 1
        for name, body, pool_ in _convnet_blocks(backbone):
            result.append(Stage(name, body[0].out_channels, stride))
            if pool_ is not None:
                stride *= 2
        return result
    if isinstance(backbone, ResNet):
        stem = backbone.conv1.stride[0] * (2 if isinstance(backbone.maxpool, nn.MaxPool2d) else 1)
        result = [Stage("stem", backbone.conv1.out_channels, stem)]
        stride = stem
        for name in ("layer1", "layer2", "layer3", "layer4"):
            layer = getattr(backbone, name)
            first = layer[0]
            stride *= first.conv1.stride[0] if first.conv1.stride[0] > 1 else first.conv2.stride[0]
            last = layer[-1]
            channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
            result.append(Stage(name, channels, stride))
        return result
    if isinstance(backbone, WideResNet):
        result, stride = [Stage("stem", backbone.stem.out_channels, backbone.stem.stride[0])], backbone.stem.stride[0]
        for name in ("group1", "group2", "group3"):
            group = getattr(backbone, name)
            stride *= group[0].conv1.stride[0]
            result.append(Stage(name, group[-1].conv2.out_channels, stride))
        return result
    raise _unsupported(backbone)


def stage(backbone: nn.Module, name: str | None = None) -> Stage:
    """One stage's description (default: the last)."""
    all_stages = stages(backbone)
    if name is None:
        return all_stages[-1]
    for s in all_stages:
        if s.name == name:
            return s
    raise SSLError(f"{type(backbone).__name__} has no stage {name!r}; its stages are {[s.name for s in all_stages]}")
