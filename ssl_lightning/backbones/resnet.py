"""torchvision ResNets without their classifier, with the optional CIFAR stem (3x3 conv, no max-pool) and an optional
LayerNorm (``norm="layer"``: ``GroupNorm(1, C)``, per-sample statistics) in place of BatchNorm."""
from __future__ import annotations

from torch import nn
from torchvision import models

from ssl_lightning.backbones.registry import BACKBONES


_NORM_LAYERS = {"batch": nn.BatchNorm2d,
                "layer": lambda channels: nn.GroupNorm(1, channels)}  # LayerNorm over each sample's (C, H, W) (CPC v2)


def _resnet(arch: str, in_channels: int = 3, cifar_stem: bool = False, zero_init_residual: bool = False,
            norm: str = "batch") -> nn.Module:
    if norm not in _NORM_LAYERS:
        raise ValueError(f"norm must be one of {sorted(_NORM_LAYERS)}, got {norm!r}")
    model = getattr(models, arch)(weights=None, zero_init_residual=zero_init_residual, norm_layer=_NORM_LAYERS[norm])
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()  # keeps torchvision's state-dict keys, so weights export as a plain ResNet
    return model


for _arch in ("resnet18", "resnet34", "resnet50"):
    BACKBONES.register(_arch)(lambda arch=_arch, **kw: _resnet(arch, **kw))
