"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020)."""
from __future__ import annotations

import torch

from ssl_lightning.heads import mlp
from ssl_lightning.losses import nt_xent
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS


@METHODS.register("simclr")
class SimCLR(SSLMethod):
    """NT-Xent between the projections of two views, negatives from the global batch (with gradient).

    Args:
        temperature: T of NT-Xent (0.1 ImageNet, 0.5 CIFAR recipe).
        proj_hidden, proj_out: projector widths (2048 -> 128 in the paper). As in the official code
            (``model_util.projection_head``), both layers are followed by BatchNorm: the last linear layer
            has no bias and its BatchNorm a scale but no shift (``center=False``). Both views go through
            the projector in one pass (official ``model.py`` concatenates them), so its BatchNorm
            statistics are over the 2B projections, not each view's B.
        **kwargs: :class:`SSLMethod` options (backbone, optimizer, lr, ...).
    """

    def __init__(self, temperature: float = 0.5, proj_hidden: int = 2048, proj_out: int = 128, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projector = mlp([self.backbone.num_features, proj_hidden, proj_out], last_norm=True, last_center=False)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        z_a, z_b = self.projector(torch.cat(feats[:2])).chunk(2)  # one pass: BN statistics over both views
        return nt_xent(z_a, z_b, self.hparams.temperature)
