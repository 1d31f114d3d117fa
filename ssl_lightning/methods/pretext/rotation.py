"""Rotation prediction (Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018; gidariss/FeatureLearningRotNet)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.heads import mlp
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.pretext.rotation import NUM_ROTATIONS, rotate_batch
from ssl_lightning.registry import SSLError


@METHODS.register("rotation")
class Rotation(SSLMethod):
    """The 4 rotations (0, 90, 180, 270 degrees) of every image of the first view, stacked in one batch of 4B
    (:func:`~ssl_lightning.pretext.rotation.rotate_batch`), and a 4-way classifier on the backbone features:
    ``L = CE(head(f(rot_k(x))), k)``, chance ``ln 4 = 1.386``.

    Args:
        hidden: hidden width of the classifier head; 0 (default) = one linear layer on the pooled features
            (RotNet's classifier after global pooling).
        nesterov: Nesterov momentum for ``optimizer: sgd`` (the paper's recipe); set on every parameter group.
        **kwargs: :class:`SSLMethod` options.

    No random draws (all four rotations of every image). The base class's pass over the first view feeds the
    online probe and kNN (upright images); the 4B rotated samples get their own pass. The batch size and
    ``lr`` count images, not rotated samples: RotNet's batch of 128 images is 512 samples.
    """

    def __init__(self, hidden: int = 0, nesterov: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if nesterov and (self.hparams.optimizer != "sgd" or self.hparams.momentum <= 0):
            raise SSLError(f"Rotation: nesterov needs optimizer: sgd with momentum > 0, got optimizer: "
                           f"{self.hparams.optimizer}, momentum: {self.hparams.momentum}: set nesterov: false or use SGD")
        dims = [self.backbone.num_features] + ([hidden] if hidden else []) + [NUM_ROTATIONS]
        self.head = mlp(dims)

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.hparams.nesterov:
            for group in config["optimizer"].param_groups:
                group["nesterov"] = True
        return config

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        x4, target = rotate_batch(views[0])
        logits = self.head(self.backbone(x4))
        return {"loss": F.cross_entropy(logits, target), "accuracy": (logits.argmax(1) == target).float().mean()}
