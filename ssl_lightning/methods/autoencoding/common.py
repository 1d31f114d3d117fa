"""What the reconstruction methods share: the decoder, the encoder pass over corrupted inputs, and the pixel units.

Views arrive normalised with the dataset's mean and std (``data.views``), so in their units the dataset mean is 0
(the context encoder's fill) and a raw pixel value v is ``(v - mean) / std`` (masking noise's 0, the cross-entropy's
[0, 1] targets): :class:`~ssl_lightning.modules.normalisation.ViewNormalisation` keeps them (``self.normalisation``).
"""
from __future__ import annotations

import torch

from ssl_lightning.backbones.feature_maps import forward_features, pool
from ssl_lightning.decoders import build_decoder
from ssl_lightning.methods.pretext.common import PretextMethod
from ssl_lightning.modules.batchnorm import frozen_bn_stats
from ssl_lightning.modules.normalisation import ViewNormalisation
from ssl_lightning.registry import SSLError

BOTTLENECKS = ("pooled", "map")


class ReconstructionMethod(PretextMethod):
    """:class:`~ssl_lightning.methods.pretext.common.PretextMethod` with a decoder back to images.

    Args:
        image_size: the side of the training views (the first view's crop size), which the decoder's output matches.
        bottleneck: ``"pooled"`` (default): the decoder starts from the pooled backbone features, the representation
            itself (a 1x1 code, as the context encoder's bottleneck); ``"map"``: from the last feature map.
        stage: decode from this backbone stage instead of the last (``feature_maps.stages``), e.g. ``layer3``.
        mean, std: the per-channel statistics the views were normalised with; None = the datamodule's (needed by the
            cross-entropy loss and masking noise, which work in raw pixels).
        **kwargs: :class:`~ssl_lightning.methods.pretext.common.PretextMethod` options.
    """

    def __init__(self, image_size: int = 32, bottleneck: str = "pooled", stage: str | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if bottleneck not in BOTTLENECKS:
            raise SSLError(f"{type(self).__name__}: unknown bottleneck {bottleneck!r}: choose one of {', '.join(BOTTLENECKS)}")
        channels = self.hparams.in_channels
        self.decoder = build_decoder(self.backbone, channels, image_size, stage=stage, from_pooled=bottleneck == "pooled")
        self.normalisation = ViewNormalisation(channels, mean, std, owner=type(self).__name__)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.normalisation.read(getattr(self.trainer, "datamodule", None))

    def check_images(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != (self.hparams.image_size,) * 2:
            raise SSLError(f"{type(self).__name__} was built for {self.hparams.image_size} px views, got "
                           f"{tuple(x.shape[-2:])}: set model.image_size to the first view's crop size ({x.shape[-1]})")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code the decoder reads: pooled features or the feature map of ``x``. BatchNorm's running statistics are
        left to the clean images of the base class's pass (the evaluations normalise with them)."""
        with frozen_bn_stats(self.backbone):
            fmap = forward_features(self.backbone, x, self.hparams.stage)
        return pool(fmap) if self.hparams.bottleneck == "pooled" else fmap

