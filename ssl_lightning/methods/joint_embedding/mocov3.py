"""MoCo v3 (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021).

Follows facebookresearch/moco-v3 moco/builder.py.
"""
from __future__ import annotations

import torch

from ssl_lightning.heads import mlp
from ssl_lightning.losses.metric.infonce import mocov3_infonce
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules import momentum_copy


@METHODS.register("mocov3")
class MoCoV3(SSLMethod):
    """Query branch: backbone f, projector g, predictor h; momentum branch: EMA copies of f and g.
    For the two views x1, x2 (q = h(g(f(x))), k = g_m(f_m(x)) without gradient):

        L = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2T * CE(q k_all^T / T, arange(N) + N * rank)

    where k_all are the keys of the global batch (gathered from all processes): in-batch negatives,
    no queue. The momentum m follows a cosine schedule from ``momentum_base`` to 1.

    Args:
        temperature: T (0.2 as in the paper's ViT recipe; the official ResNet-50 runs use 1.0).
        proj_layers: projector depth (3 in the paper; the official ResNet-50 code uses 2).
        proj_hidden, proj_out: projector widths (4096 -> 256); its last BN has no affine (SimCLR v2 style).
        pred_hidden: the 2-layer predictor proj_out -> pred_hidden -> proj_out (4096).
        momentum_base, momentum_final: m, cosine from 0.99 to 1.0.
    """

    concat_views = False  # the official code runs each view through the encoders separately

    def __init__(self, temperature: float = 0.2, proj_layers: int = 3, proj_hidden: int = 4096,
                 proj_out: int = 256, pred_hidden: int = 4096, momentum_base: float = 0.99,
                 momentum_final: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        dims = [self.backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_out]
        self.projector = mlp(dims, last_norm=True, last_affine=False)
        self.predictor = mlp([proj_out, pred_hidden, proj_out])
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_projector = momentum_copy(self.projector)

    def momentum_pairs(self):
        return [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        q1, q2 = (self.predictor(self.projector(f)) for f in feats[:2])
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(f) for f in self.forward_views(views[:2], self.momentum_backbone))
        t = self.hparams.temperature
        return mocov3_infonce(q1, k2, t) + mocov3_infonce(q2, k1, t)
