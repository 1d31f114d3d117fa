"""Optimizer parameter groups, SGD / LARS / AdamW, and the per-step warm-up + cosine schedule."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from lightly.utils.lars import LARS
from torch import nn

from ssl_lightning.registry import SSLError

OPTIMIZERS = ("sgd", "lars", "adamw")


def param_groups(params: Iterable[nn.Parameter], weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Two groups: weights with ``weight_decay``, and biases / norm parameters (ndim <= 1) without.

    A group with weight decay 0 is also excluded from LARS's trust-ratio adaptation (lightly's LARS),
    as in SimCLR and BYOL.
    """
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, **extra}, {"params": no_decay, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def build_optimizer(name: str, groups: Iterable[dict[str, Any]], lr: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), nesterov: bool = False) -> torch.optim.Optimizer:
    """``nesterov``: Nesterov momentum for SGD (needs ``momentum > 0``); refused for the other optimizers."""
    groups = list(groups)
    name = name.lower()
    if nesterov and (name != "sgd" or momentum <= 0):
        raise SSLError(f"nesterov: true needs optimizer: sgd with momentum > 0, got optimizer: {name}, momentum: "
                       f"{momentum}: set nesterov: false, or use SGD with momentum")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise SSLError(f"Unknown optimizer {name!r}. Choose one of: {', '.join(OPTIMIZERS)}.")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to ``final_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
