"""Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021)."""
from __future__ import annotations

import torch

from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.barlow_twins import barlow_twins_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS


@METHODS.register("barlow_twins")
class BarlowTwins(SSLMethod):
    """Push the cross-correlation of the two views' embeddings to the identity:
    ``C = BN(z_A)^T BN(z_B) / N``, ``L = sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2``
    (official facebookresearch/barlowtwins main.py), with BN's mean and variance and N taken over
    the GLOBAL batch (gathered across processes with gradient; see :func:`barlow_twins_loss`).

    Args:
        lambd: weight of the redundancy-reduction term (0.0051).
        proj_hidden, proj_out: projector widths, 8192-8192-8192 in the paper (3 linear layers,
            BN + ReLU after the first two, no bias on the last).
        lr_biases: learning rate per 256 images of biases and norm parameters (the official code's
            0.0048, vs 0.2 for weights); None = the same ``lr`` as the weights.
        **kwargs: :class:`SSLMethod` options (paper: LARS lr 0.2 per 256, wd 1e-6 (code), batch 2048).
    """

    concat_views = False  # the official code runs each view through the network separately

    def __init__(self, lambd: float = 0.0051, proj_hidden: int = 8192, proj_out: int = 8192,
                 lr_biases: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projector = mlp([self.backbone.num_features, proj_hidden, proj_hidden, proj_out], last_bias=False)

    def extra_param_groups(self):
        if self.hparams.lr_biases is None:
            return []
        probe = {id(p) for p in (self.probe.parameters() if self.probe else [])}
        biases = [p for p in self.parameters() if p.ndim <= 1 and p.requires_grad and id(p) not in probe]
        lr = self.hparams.lr_biases * self.global_batch_size() / 256
        return [{"params": biases, "lr": lr, "weight_decay": 0.0, "name": "biases"}]

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        z_a, z_b = (self.projector(f) for f in feats[:2])
        return barlow_twins_loss(z_a, z_b, self.hparams.lambd)
