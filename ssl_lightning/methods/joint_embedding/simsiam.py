"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021)."""
from __future__ import annotations

import torch

from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.simsiam import normalized_std, simsiam_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.optim import param_groups


@METHODS.register("simsiam")
class SimSiam(SSLMethod):
    """One network, a predictor, and a stop-gradient: ``z = h_proj(f(x))``, ``p = h_pred(z)``,
    ``L = -1/2 [cos(p1, sg(z2)) + cos(p2, sg(z1))]`` (official simsiam/builder.py).

    Projector: fc-BN-ReLU, fc-BN-ReLU, fc-BN(affine=False), 2048 wide; predictor: fc-BN-ReLU-fc,
    2048 -> 512 -> 2048. No negatives, no momentum encoder, no gathering across processes. Logs
    ``z_std`` (std of the L2-normalised z over the batch x sqrt(d)): ~1 healthy, 0 collapsed.

    Args:
        proj_hidden, proj_out: projector widths (2048, 2048).
        pred_hidden: predictor bottleneck (512).
        fix_pred_lr: keep the predictor's learning rate constant (not scheduled), as in the paper's recipe.
        **kwargs: :class:`SSLMethod` options (paper: SGD lr 0.05 per 256, wd 1e-4, momentum 0.9, batch 512).
    """

    concat_views = False  # the official code runs each view through the network separately (own BN statistics)

    def __init__(self, proj_hidden: int = 2048, proj_out: int = 2048, pred_hidden: int = 512,
                 fix_pred_lr: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projector = mlp([self.backbone.num_features, proj_hidden, proj_hidden, proj_out],
                             last_norm=True, last_affine=False)
        self.predictor = mlp([proj_out, pred_hidden, proj_out])

    def extra_param_groups(self):
        if not self.hparams.fix_pred_lr:
            return []
        return param_groups(self.predictor.parameters(), self.hparams.weight_decay, fixed_lr=True, name="predictor")

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        z1, z2 = (self.projector(f) for f in feats[:2])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return {"loss": simsiam_loss(p1, p2, z1, z2), "z_std": normalized_std(z1)}
