"""Export a pretrained backbone as a plain state dict, loadable without this package.

* ResNets: torchvision's keys (our ResNet *is* torchvision's with ``fc = Identity``): load into
  ``torchvision.models.resnet50()`` with ``strict=False`` (only ``fc.weight`` / ``fc.bias`` are missing:
  the pretrained network has no classifier), then train a new ``fc`` or set ``model.fc = nn.Identity()``.
  The CIFAR stem (``conv1`` 3x3 stride 1, no max-pool) or other input channels must be rebuilt first.
* ViTs: timm's keys: ``timm.create_model("vit_small_patch16_224", num_classes=0, ...)`` loads strictly.
* The ConvNet: its own state dict (``ssl_lightning.backbones.build_backbone("convnet", ...)``).

Beside ``<name>.pt`` a ``<name>.json`` records the backbone, its options and how to load it
(:func:`ssl_lightning.evaluation.checkpoint.load_backbone` reads it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _resnet_note(name: str, kwargs: dict[str, Any], in_channels: int) -> str:
    steps = [f"model = torchvision.models.{name}()"]
    if kwargs.get("cifar_stem"):
        steps.append(f"model.conv1 = torch.nn.Conv2d({in_channels}, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()")
    elif in_channels != 3:
        steps.append(f"model.conv1 = torch.nn.Conv2d({in_channels}, 64, 7, 2, 3, bias=False)")
    steps += ["missing, unexpected = model.load_state_dict(torch.load(path, weights_only=True), strict=False)  "
              "# missing = fc.weight, fc.bias", "model.fc = torch.nn.Identity()  # or a new classifier"]
    return "; ".join(steps)


def describe(info: dict[str, Any]) -> dict[str, Any]:
    """Format (torchvision / timm / ssl_lightning) and a loading recipe for a backbone described by ``info``."""
    name, kwargs, c = info["backbone"], info.get("backbone_kwargs") or {}, info["in_channels"]
    if name.startswith("resnet"):
        return {"format": "torchvision", "load": _resnet_note(name, kwargs, c)}
    if name.startswith("vit_"):
        args = ", ".join(f"{k}={v!r}" for k, v in {"num_classes": 0, "in_chans": c, **kwargs}.items())
        return {"format": "timm", "load": f"model = timm.create_model('{name}_patch16_224', {args}); "
                                          "model.load_state_dict(torch.load(path, weights_only=True))"}
    args = ", ".join(f"{k}={v!r}" for k, v in {"in_channels": c, **kwargs}.items())
    return {"format": "ssl_lightning", "load": f"model = ssl_lightning.backbones.build_backbone('{name}', {args}); "
                                               "model.load_state_dict(torch.load(path, weights_only=True))"}


def export_backbone(backbone: nn.Module, info: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Writes ``backbone``'s state dict (contiguous CPU tensors) to ``path`` and its description to
    ``path`` with suffix ``.json``; returns the description."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    torch.save(state, path)
    meta = {"backbone": info["backbone"], "backbone_kwargs": dict(info.get("backbone_kwargs") or {}),
            "in_channels": int(info["in_channels"]), "num_features": int(backbone.num_features),
            "method": info.get("method"), "source": info.get("checkpoint"), "component": info.get("component", "backbone"),
            "data": info.get("data") or {}, "weights": str(path), "num_tensors": len(state), **describe(info)}
    if info.get("input"):  # a colour method's encoder input space (ToNetworkInput), read back by load_backbone
        meta["input"] = info["input"]
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta
