from __future__ import annotations

from typing import Any

from torch import nn

from ssl_lightning.registry import Registry

BACKBONES: Registry = Registry("backbone")


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone; the result exposes ``num_features`` (its output width)."""
    model = BACKBONES.build(name, **kwargs)
    assert hasattr(model, "num_features"), f"backbone {name} does not set num_features"
    return model
