"""The per-channel statistics the views were normalised with, for methods whose targets are raw pixels.

The data pipeline hands a method views ``(v - mean) / std``. A method that predicts or corrupts raw pixels (the
autoencoders' cross-entropy targets and masking noise, colorization's Lab conversion) needs ``mean`` and ``std``
back: :class:`ViewNormalisation` keeps them as buffers (checkpoints carry them), reads them from the datamodule at
``setup`` when they were not given, and refuses to convert while they are unknown rather than guess.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ssl_lightning.registry import SSLError


class ViewNormalisation(nn.Module):
    """Buffers ``mean`` and ``std`` (C,) of the views' normalisation; NaN (unknown) until given or :meth:`read`.

    Args:
        channels: the views' channels.
        mean, std: the statistics, if known when the method is built (None: read from the datamodule).
        owner: the method's name, for the error raised when the statistics are needed but unknown.
    """

    def __init__(self, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 owner: str = "this method") -> None:
        super().__init__()
        self.owner = owner
        if (mean is None) != (std is None):
            raise SSLError(f"{owner}: give both mean and std (the dataset's per-channel statistics), or neither")
        self.register_buffer("mean", self._statistic("mean", mean, channels))
        self.register_buffer("std", self._statistic("std", std, channels))
        if mean is not None and not bool((self.std > 0).all()):
            raise SSLError(f"{owner}: std must be positive, got {list(std)}")

    def _statistic(self, name: str, values: Sequence[float] | None, channels: int) -> torch.Tensor:
        if values is None:
            return torch.full((channels,), math.nan)
        t = torch.as_tensor(values, dtype=torch.float32).flatten()
        if t.numel() != channels:
            raise SSLError(f"{self.owner}: {name} has {t.numel()} values for {channels}-channel images: give one per "
                           "channel")
        return t

    @property
    def known(self) -> bool:
        return not bool(torch.isnan(self.mean).any() or torch.isnan(self.std).any())

    def read(self, datamodule: Any) -> None:
        """Take the datamodule's ``mean`` / ``std`` (those its views were normalised with) unless already known."""
        if self.known or getattr(datamodule, "mean", None) is None or getattr(datamodule, "std", None) is None:
            return
        self.mean.copy_(self._statistic("mean", datamodule.mean, self.mean.numel()))
        self.std.copy_(self._statistic("std", datamodule.std, self.std.numel()))

    def _check(self) -> None:
        if not self.known:
            raise SSLError(f"{self.owner} does not know how its images were normalised: give mean and std (the "
                           "dataset's), or train with an SSLDataModule (they are read from it)")

    def to_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Views ``(B, C, H, W)`` back to raw pixels, clamped to [0, 1] (float32)."""
        self._check()
        return (x.float() * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)).clamp(0, 1)

    def from_raw(self, value: float) -> torch.Tensor:
        """The raw pixel ``value`` (0 = black, 1 = white) in the views' units, per channel, shape (1, C, 1, 1)."""
        self._check()
        return ((value - self.mean) / self.std).view(1, -1, 1, 1)
