"""W-MSE (Ermolov et al., "Whitening for Self-Supervised Representation Learning", ICML 2021)."""
from __future__ import annotations

import torch

from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.wmse import wmse_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS


@METHODS.register("wmse")
class WMSE(SSLMethod):
    """Whitened MSE between all pairs of positives (follows htdt/self-supervised methods/w_mse.py).

    ``z = g(f(x))`` (emb dims); every iteration splits the batch into random sub-batches of ``w_size``,
    whitens each view's sub-batch with ``W = L^{-1}`` (Cholesky of its covariance, so ``Cov(W z) = I``),
    and ``L = mean over positive pairs (i < j) of 2 - 2 cos(W z_i, W z_j)``, averaged over ``w_iter``
    iterations. Whitening (not a negative term or a target network) prevents collapse.

    Args:
        emb: embedding dimension d (64 CIFAR, 128 STL-10 / Tiny ImageNet). proj_hidden: projector
            width (1024, one hidden layer with BN).
        w_size: whitening sub-batch (128 CIFAR, 256 STL-10); must exceed ``emb`` and divide the global batch.
        w_iter: whitening iterations (random sub-batch splits) per step (1; 4 for W-MSE 2 on STL-10).
        w_eps: shrinkage of the covariance towards I (0 in the paper).
        Defaults: AdamW lr 3e-3 per 256 images, wd 1e-6 (the paper: Adam, L2 1e-6).
    """

    concat_views = False  # the official code runs each view through the encoder separately

    def __init__(self, emb: int = 64, proj_hidden: int = 1024, w_size: int = 128, w_iter: int = 1,
                 w_eps: float = 0.0, optimizer: str = "adamw", lr: float = 3e-3, weight_decay: float = 1e-6,
                 **kwargs) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        self.projector = mlp([self.backbone.num_features, proj_hidden, emb])

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        z = self.projector(torch.cat(feats)).split(feats[0].shape[0])  # one head pass, as the official code
        hp = self.hparams
        return wmse_loss(z, hp.w_size, hp.w_iter, hp.w_eps)
