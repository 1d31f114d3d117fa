"""Decoder registry: one builder per backbone family, chosen from the backbone's type by :func:`build_decoder`."""
from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import ResNet

from ssl_lightning.backbones.convnet import ConvNet
from ssl_lightning.registry import Registry, SSLError

#: decoder builders by backbone family (``DECODERS.get("resnet")(backbone, ...)``)
DECODERS: Registry = Registry("decoder")


def decoder_family(backbone: nn.Module) -> str:
    """The registry key of the decoder that matches ``backbone``."""
    if isinstance(backbone, ConvNet):
        return "convnet"
    if isinstance(backbone, ResNet):
        return "resnet"
    raise SSLError(f"no decoder matches a {type(backbone).__name__} backbone: reconstruction methods (autoencoders, "
                   f"context encoder) take the 'convnet' or a 'resnet*' backbone (registered decoders: "
                   f"{', '.join(DECODERS.names())})")


def build_decoder(backbone: nn.Module, out_channels: int, image_size: int, name: str | None = None,
                  **kwargs: Any) -> nn.Module:
    """The decoder matching ``backbone`` (or the registered ``name``): feature map of its last stage (or ``stage``)
    -> ``(B, out_channels, image_size / out_stride, ...)``. Options: :class:`~ssl_lightning.decoders.upsampling.UpsamplingDecoder`'s
    (``stage``, ``from_pooled``, ``out_stride``)."""
    return DECODERS.build(name or decoder_family(backbone), backbone=backbone, out_channels=out_channels,
                          image_size=image_size, **kwargs)
