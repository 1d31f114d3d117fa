"""Backbone registry: ``build_backbone("resnet18", cifar_stem=True)`` returns a module with ``num_features``.

Every backbone maps images ``(B, C, H, W)`` to pooled features ``(B, num_features)``; ConvNet and the ResNets
also give their intermediate feature maps through ``ssl_lightning.backbones.feature_maps`` (stage names, channels,
strides).
"""
from ssl_lightning.backbones.registry import BACKBONES, build_backbone
from ssl_lightning.backbones import convnet, resnet, vit  # noqa: F401  (registers the backbones)
from ssl_lightning.backbones import wide_resnet  # noqa: F401  (WRN-28-2 / -28-8 of MixMatch and FixMatch)

__all__ = ["BACKBONES", "build_backbone"]
