"""Loading what a pretraining run produced -- a Lightning ``.ckpt`` or an exported backbone weight file --
for evaluation, with ``torch.load(..., weights_only=True)`` only: a file whose pickle holds anything but
tensors and plain containers is refused instead of executed.

    module = load_module("runs/simclr-cifar10-.../checkpoints/last.ckpt")      # the whole SSLMethod
    backbone, info = load_backbone("runs/.../checkpoints/last.ckpt")          # just its backbone
    backbone, info = load_backbone("runs/.../eval/export/backbone.pt")        # an exported one

``info`` says what was loaded: backbone name, kwargs, in_channels, num_features, method class path, the
run directory and the pretraining data settings (from the run's ``config.yaml``) when they are known.
"""
from __future__ import annotations

import importlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.registry import SSLError


def safe_load(path: str | Path) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; refuses pickled code with an SSLError."""
    path = Path(path)
    if not path.is_file():
        raise SSLError(f"Checkpoint {str(path)!r} not found: give the path of a .ckpt or an exported weight file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SSLError(f"Refusing to load {str(path)!r}: it holds pickled Python objects besides tensors, and "
                       f"unpickling them could run code ({first[:160]}). Load only files you trust, re-saved as a "
                       "plain state dict (torch.save(model.state_dict(), path)) or via `ssl-lightning export`.") from None


def is_lightning_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj


def run_dir_of(path: str | Path) -> Path:
    """``runs/<run>`` for ``runs/<run>/checkpoints/x.ckpt`` and an export's ``runs/<run>/eval/export/x.pt``;
    otherwise the file's own folder."""
    path = Path(path).resolve()
    if path.parent.name == "checkpoints":
        return path.parent.parent
    if path.parent.name == "export" and path.parent.parent.name == "eval":
        return path.parent.parent.parent
    return path.parent


def run_config(path: str | Path) -> dict[str, Any]:
    """The run's resolved CLI config (``<run_dir>/config.yaml``), or {} when there is none."""
    config = run_dir_of(path) / "config.yaml"
    return (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}


def resolve_method(name: str) -> type:
    """A registered method name (``simclr``), class name (``SimCLR``) or import path -> the SSLMethod subclass."""
    from ssl_lightning.methods import METHODS, SSLMethod

    if "." not in name:
        by_class = {METHODS.get(n).__name__.lower(): METHODS.get(n) for n in METHODS.names()}
        cls = by_class.get(name.lower()) or (METHODS.get(name) if name in METHODS else None)
    else:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
        raise SSLError(f"Unknown method {name!r}: give a registered method ({', '.join(METHODS.names())}) "
                       "or the import path of an SSLMethod subclass (--method my_module.MyMethod)")
    return cls


def _hparams(ckpt: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(ckpt["hyper_parameters"]).items() if not k.startswith("_")}


def load_module(path: str | Path, method: str | None = None) -> nn.Module:
    """The SSLMethod saved in a Lightning checkpoint, in eval mode on the CPU. The class comes from
    ``method``, else the checkpoint's ``_class_path`` (LightningCLI runs), else the run's config.yaml."""
    ckpt = safe_load(path)
    if not is_lightning_checkpoint(ckpt):
        raise SSLError(f"{str(path)!r} is not a Lightning checkpoint (an exported backbone holds no method): "
                       "give the run's .ckpt, or use it where only a backbone is needed")
    name = method or ckpt["hyper_parameters"].get("_class_path")
    if name is None:
        model = run_config(path).get("model")
        name = model if isinstance(model, str) else (model or {}).get("class_path")
    if name is None:
        raise SSLError(f"Cannot tell which method saved {str(path)!r} (no class path in it and no config.yaml "
                       "beside its run): name it with --method, e.g. --method simclr")
    module = resolve_method(name)(**_hparams(ckpt))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def load_backbone(path: str | Path, component: str = "backbone") -> tuple[nn.Module, dict[str, Any]]:
    """``(backbone in eval mode, info)`` from a Lightning checkpoint (the state-dict entries under
    ``component.``: ``backbone`` = the online network, e.g. ``teacher_backbone`` for DINO's teacher)
    or from an exported weight file with its ``.json`` description beside it."""
    path = Path(path)
    obj = safe_load(path)
    if is_lightning_checkpoint(obj):
        hp = _hparams(obj)
        if "backbone" not in hp:
            raise SSLError(f"{str(path)!r} has no 'backbone' hyperparameter: it was not saved by an SSLMethod")
        prefix = component + "."
        state = {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not state:
            found = sorted({k.split(".", 1)[0] for k in obj["state_dict"] if "backbone" in k.split(".", 1)[0]})
            raise SSLError(f"No {component!r} weights in {str(path)!r}; backbones in it: {', '.join(found) or 'none'} "
                           "(choose one with --component)")
        config = run_config(path)
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        info = {"backbone": hp["backbone"], "backbone_kwargs": dict(hp.get("backbone_kwargs") or {}),
                "in_channels": int(hp.get("in_channels", 3)),
                "method": obj["hyper_parameters"].get("_class_path") or model.get("class_path"),
                "data": config.get("data") or {}}
        # colour methods: the encoder's channels and input space (Lab lightness / Lab), what evaluations convert to
        info.update((obj.get("ssl_lightning") or {}).get("backbone_input") or {})
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise SSLError(f"{str(path)!r} is a plain state dict without its description {meta_path.name} beside it: "
                           "keep the .json written by `ssl-lightning export` next to the weights")
        info = json.loads(meta_path.read_text())
        state = obj
    else:
        raise SSLError(f"{str(path)!r} is neither a Lightning checkpoint nor a state dict of tensors")
    backbone = build_backbone(info["backbone"], in_channels=info["in_channels"], **info["backbone_kwargs"])
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        raise SSLError(f"The weights in {str(path)!r} do not fit backbone {info['backbone']!r} "
                       f"({str(e).splitlines()[0]})") from None
    info.update(checkpoint=str(path), component=component, num_features=int(backbone.num_features),
                run_dir=str(run_dir_of(path)))
    return backbone.eval(), info
