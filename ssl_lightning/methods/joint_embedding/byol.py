"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020)."""
from __future__ import annotations

import torch

from ssl_lightning.heads import mlp
from ssl_lightning.losses import byol_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules.ema import momentum_copy


@METHODS.register("byol")
class BYOL(SSLMethod):
    """Online network (backbone, projector, predictor) regresses the EMA target's projection of the
    other view: ``L = [2 - 2 cos(q(v1), sg(z'(v2)))] + [2 - 2 cos(q(v2), sg(z'(v1)))]``.

    Args:
        proj_hidden, proj_out: projector widths (4096 -> 256); the predictor is proj_out -> pred_hidden -> proj_out.
        momentum_base, momentum_final: target EMA momentum, cosine from base (0.99 for 300 epochs,
            0.996 for 1000) to final (1.0) over training.
    """

    concat_views = False  # the official code runs each view through the network separately

    def __init__(self, proj_hidden: int = 4096, proj_out: int = 256, pred_hidden: int = 4096,
                 momentum_base: float = 0.99, momentum_final: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projector = mlp([self.backbone.num_features, proj_hidden, proj_out])
        self.predictor = mlp([proj_out, pred_hidden, proj_out])
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_projector = momentum_copy(self.projector)

    def momentum_pairs(self):
        return [(self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)]

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        p1, p2 = (self.predictor(self.projector(f)) for f in feats[:2])
        with torch.no_grad():
            t1, t2 = (self.teacher_projector(t) for t in self.forward_views(views[:2], self.teacher_backbone))
        return byol_loss(p1, t2) + byol_loss(p2, t1)
