"""What the colour methods (Colorization, SplitBrain) share: they refuse gray data, see their images in Lab, and
give the frozen-feature evaluations the same input they were trained on.

* The views come normalised with the dataset's mean / std (the data pipeline's); :meth:`ColourMethod.rgb` undoes
  it (:class:`~ssl_lightning.modules.normalisation.ViewNormalisation`: read from the datamodule at set-up, in
  checkpoints).
* ``forward`` (the online kNN monitor and probe, ``load_module``) converts normalised RGB images to the
  encoder's input space (:func:`~ssl_lightning.pretext.color.network_input`: ``lightness`` or ``lab``).
* Checkpoints record that space and the encoder's channel count (``checkpoint["ssl_lightning"]["backbone_input"]``,
  and the encoder's own registered name where it is not the named backbone, e.g. ``split_brain``):
  ``load_backbone`` builds the encoder with it and ``ssl-lightning eval`` converts the evaluation images with
  :class:`~ssl_lightning.pretext.color.ToNetworkInput` (no normalisation after it).
* A dense head (:class:`DenseHead`) on a hypercolumn of feature maps predicts per position of a 1/``stride`` grid.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.backbones.feature_maps import stages
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.modules.normalisation import ViewNormalisation
from ssl_lightning.modules.probe import OnlineLinearProbe
from ssl_lightning.pretext.color import INPUT_SPACES, bin_counts, lab_inputs, network_input, refuse_gray
from ssl_lightning.registry import SSLError


def hypercolumn_stages(backbone: nn.Module, stride: int, names: list[str] | None = None) -> list[str]:
    """The stages the dense head reads: ``names``, or the deepest stage of stride <= ``stride`` and the last stage
    (so that every layer trains and the fine stage keeps the resolution)."""
    all_stages = stages(backbone)
    if names:
        known = {s.name for s in all_stages}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SSLError(f"unknown stage(s) {unknown}; {type(backbone).__name__} has {sorted(known)}")
        return list(names)
    fine = [s.name for s in all_stages if s.stride <= stride] or [all_stages[0].name]
    return list(dict.fromkeys([fine[-1], all_stages[-1].name]))


class DenseHead(nn.Module):
    """Per-position classifier on a hypercolumn: each map bilinearly upsampled (or kept) to the target grid,
    concatenated, then 1x1 conv - BN - ReLU - 1x1 conv (``hidden = 0``: one 1x1 conv)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 256) -> None:
        super().__init__()
        self.hidden = (nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
                       if hidden else nn.Identity())
        self.out = nn.Conv2d(hidden or in_channels, out_channels, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = torch.cat([m if tuple(m.shape[-2:]) == tuple(size) else
                       F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)
        return self.out(self.hidden(x))


def full_precision(x: torch.Tensor):
    """Autocast off: Lab conversion, bin distances and the losses in float32 under bf16 / fp16 mixed precision (ab
    values reach 100, so half-precision squared distances would pick wrong bins)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def subsample(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Every ``stride``-th position (the official 1/4-resolution targets: a stride-4 sub-sampling of ab)."""
    return x[..., ::stride, ::stride]


@torch.no_grad()
def estimate_prior(datamodule: Any, bins: torch.Tensor, num_images: int, seed: int = 0) -> torch.Tensor:
    """Bin counts (Q,) of the ab values of ``num_images`` seeded random pretraining images (un-augmented: the
    evaluation view), the empirical prior p of class rebalancing."""
    from ssl_lightning.data.views import eval_transform

    load = getattr(datamodule, "_load", None)
    if load is None:
        raise SSLError("the colour prior is estimated from the training images of an SSLDataModule; without one, "
                       "set it with set_prior(counts) before training")
    ds = load(datamodule.spec.pretrain_split)
    transform = eval_transform(datamodule.image_size, (0.0,) * 3, (1.0,) * 3, datamodule.spec.resize_eval)
    chosen = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num_images].tolist()
    counts = torch.zeros(bins.shape[0], dtype=torch.float64)
    for start in range(0, len(chosen), 256):
        images = torch.stack([transform(ds[i][0]) for i in chosen[start:start + 256]])
        refuse_gray("the colour prior", images.shape[1])
        counts += bin_counts(lab_inputs(images)[1].double(), bins)
    return counts


class ColourMethod(SSLMethod):
    """:class:`SSLMethod` for encoders that take Lab input built from the RGB views (see the module's notes).

    Args:
        mean, std: the per-channel statistics the views were normalised with; None = the datamodule's.
        **kwargs: :class:`SSLMethod` options; ``in_channels`` must be 3 (the data's channels).
    """

    input_space: str = "lightness"  # what the encoder takes: network_input(rgb, input_space)

    def __init__(self, mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                 **kwargs) -> None:
        refuse_gray(type(self).__name__, int(kwargs.get("in_channels", 3)))
        super().__init__(**kwargs)
        # the encoder takes the input space's channels, not the data's (``in_channels``, linked by the CLI)
        self.backbone = self.build_encoder()
        if self.hparams.compile:
            self.backbone.compile()
        if self.probe is not None:
            self.probe = OnlineLinearProbe(self.backbone.num_features, self.hparams.num_classes)
        self.normalisation = ViewNormalisation(3, mean, std, owner=type(self).__name__)
        self._encoded: dict[str, Any] | None = None

    def build_encoder(self) -> nn.Module:
        """The encoder (``self.backbone``): the named backbone taking the input space's channels."""
        hp = self.hparams
        return build_backbone(hp.backbone, in_channels=INPUT_SPACES[self.input_space], **(hp.backbone_kwargs or {}))

    def encoder_spec(self) -> dict[str, Any]:
        """What checkpoints record for ``load_backbone`` / ``ssl-lightning eval``: the input space and channels
        (and, where the encoder is not the named backbone itself, its registered name and options)."""
        return {"input": self.input_space, "in_channels": INPUT_SPACES[self.input_space]}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "mean", None) is not None:
            refuse_gray(type(self).__name__, len(dm.mean))
        self.normalisation.read(dm)

    def rgb(self, x: torch.Tensor) -> torch.Tensor:
        """The views (normalised) back to RGB in [0, 1]."""
        refuse_gray(type(self).__name__, x.shape[1])
        return self.normalisation.to_raw(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of normalised RGB images, converted to the encoder's input (what kNN / the probe use)."""
        with full_precision(x):
            x = network_input(self.rgb(x), self.input_space)
        return self.backbone(x)

    def encode(self, rgb: torch.Tensor) -> dict[str, Any]:
        """One encoder pass over RGB images in [0, 1]: ``{"feats": pooled features, ...what loss() needs}``."""
        raise NotImplementedError

    def forward_views(self, views: list[torch.Tensor], network: nn.Module | None = None) -> list[torch.Tensor]:
        """One pass over the first view: its maps are kept for :meth:`loss`, their pooled last map is the probe's
        input; further views (if any) are only pooled."""
        if network is not None:
            return super().forward_views(views, network)
        self._encoded = self.encode(self.rgb(views[0]))
        return [self._encoded["feats"]] + [self(v) for v in views[1:]]

    def take_encoded(self) -> dict[str, Any]:
        encoded, self._encoded = self._encoded, None
        if encoded is None:
            raise SSLError(f"{type(self).__name__}.loss needs forward_views(views) first (training_step calls it)")
        return encoded

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ssl_lightning"]["backbone_input"] = self.encoder_spec()
