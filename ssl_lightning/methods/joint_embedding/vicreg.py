"""VICReg (Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022)."""
from __future__ import annotations

import torch

from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.vicreg import vicreg_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS


@METHODS.register("vicreg")
class VICReg(SSLMethod):
    """``L = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]`` on the expander outputs
    (official facebookresearch/vicreg main_vicreg.py):

    - invariance ``s = MSE(z, z')`` on this process's batch;
    - variance ``v = mean_j relu(1 - sqrt(Var z_j + 1e-4))`` (the two views averaged, as the official code);
    - covariance ``c = sum_{i != j} Cov_ij^2 / d`` (centred, divided by N - 1; the two views summed);
      v and c on the batch gathered across processes with gradient.

    Args:
        sim_coeff, std_coeff, cov_coeff: lambda, mu, nu of the paper (25, 25, 1).
        proj_hidden, proj_out: expander widths, 8192-8192-8192 in the paper.
        **kwargs: :class:`SSLMethod` options (paper: LARS lr 0.2 per 256, wd 1e-6, batch 2048).
    """

    concat_views = False  # the official code runs each view through the network separately

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 proj_hidden: int = 8192, proj_out: int = 8192, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projector = mlp([self.backbone.num_features, proj_hidden, proj_hidden, proj_out], last_bias=False)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        z_a, z_b = (self.projector(f) for f in feats[:2])
        hp = self.hparams
        return vicreg_loss(z_a, z_b, hp.sim_coeff, hp.std_coeff, hp.cov_coeff)
