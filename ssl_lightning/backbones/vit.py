"""timm Vision Transformers (registered always, built only when timm is installed)."""
from __future__ import annotations

from torch import nn

from ssl_lightning.backbones.registry import BACKBONES
from ssl_lightning.registry import SSLError


def _vit(arch: str, in_channels: int = 3, img_size: int = 224, patch_size: int = 16, **kwargs) -> nn.Module:
    try:
        import timm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SSLError(f"Backbone {arch!r} needs timm: pip install timm") from e
    return timm.create_model(
        f"{arch}_patch16_224", pretrained=False, num_classes=0, in_chans=in_channels,
        img_size=img_size, patch_size=patch_size, **kwargs,
    )


for _arch in ("vit_tiny", "vit_small", "vit_base"):
    BACKBONES.register(_arch)(lambda arch=_arch, **kw: _vit(arch, **kw))
