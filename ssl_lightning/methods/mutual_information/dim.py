"""Deep InfoMax (Hjelm et al., "Learning Deep Representations by Mutual Information Estimation and Maximization",
ICLR 2019; rdevon/DIM ``models/dim.py``, ``models/prior_matching.py``, ``configs/convnets.py``)."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ssl_lightning.backbones.feature_maps import feature_maps, pool, stage, stages
from ssl_lightning.heads import mlp
from ssl_lightning.losses.mutual_information import (DIM_ESTIMATORS, dim_loss, prior_discriminator_loss,
                                                     prior_encoder_loss)
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.mutual_information.mi_networks import MapEncoder, MI1x1ConvNet
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.registry import SSLError


@METHODS.register("dim")
class DeepInfoMax(SSLMethod):
    """Maximise the mutual information between an image's encoding ``y = E(x)`` and its local features.

    ``loss = beta * local + alpha * global + gamma * prior`` (+ the prior discriminator's own loss):

    * local: ``y`` against every position of a backbone stage's map C (``local_stage``), scores
      ``T = MI1x1(y) . MI1x1(C)_p`` (the 1x1-conv MI networks), negatives = all positions of the other images of
      the global batch (gathered across processes with gradient), averaged over positions as the official code;
    * global: ``y`` against the whole map, ``T = Linear(y) . MapEncoder(C)``, the other images as negatives;
    * prior: ``sigmoid(y)`` matched to U[0, 1]^d by a discriminator (Linear 1000-ReLU-200-ReLU-1, measure GAN,
      the official gradient penalty on real and fake); the encoder gets the non-saturating generator loss.
    Each of the local and global terms is one of the estimators ``jsd``, ``dv``, ``infonce``
    (:mod:`ssl_lightning.losses.mutual_information.dim`).

    ``y`` = ``encoding(pooled backbone features)``: Linear-BN-ReLU(1024)-Linear(64), the official encoder's
    fc 1024 + 64-unit output on top of its convolutions; the probes and evaluations read the pooled backbone
    features. One view per image. The discriminator is a parameter group of the one optimizer (no weight decay):
    with Adam (``adamw``, weight decay 0: the paper's optimizer) that is the same update as its own Adam. Its loss
    reaches only its parameters (the encodings are detached) and the encoder's prior loss only the encoder (the
    discriminator's parameters enter it detached), so one backward gives both the official updates.

    Args:
        estimator: ``jsd`` (the paper's default), ``dv`` or ``infonce``.
        local_stage: the backbone stage giving the local map; None = the stage before the last (ConvNet
            ``block3``, ResNet ``layer3``; the official CIFAR net uses its second of three convs, 8 x 8).
        encoding_dim, encoding_hidden: widths of ``y`` (64) and of the layer before it (1024).
        mi_units: width of the MI networks' space (2048).
        alpha, beta, gamma: weights of the global, local and prior terms (DIM(L): 0, 1, 0.1, paper).
        prior_gradient_penalty: weight of the discriminator's gradient penalty (1.0, ``Discriminator.routine``).
        **kwargs: :class:`SSLMethod` options (backbone, optimizer, lr, ...).
    """

    def __init__(self, estimator: str = "jsd", local_stage: str | None = None, encoding_dim: int = 64,
                 encoding_hidden: int = 1024, mi_units: int = 2048, alpha: float = 0.0, beta: float = 1.0,
                 gamma: float = 0.1, prior_gradient_penalty: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if estimator not in DIM_ESTIMATORS:
            raise SSLError(f"Unknown Deep InfoMax estimator {estimator!r}: set model.init_args.estimator to one of "
                           f"{sorted(DIM_ESTIMATORS)}")
        if min(alpha, beta, gamma) < 0 or alpha == beta == 0:
            raise SSLError(f"Deep InfoMax weights alpha={alpha} (global), beta={beta} (local), gamma={gamma} (prior) "
                           "must be >= 0 with alpha or beta > 0 (DIM(L): 0, 1, 0.1)")
        all_stages = stages(self.backbone)  # raises for a backbone without feature maps
        self.local = stage(self.backbone, local_stage) if local_stage else all_stages[-2]
        self.last = all_stages[-1].name
        self.encoding = mlp([self.backbone.num_features, encoding_hidden, encoding_dim])
        self.local_net = MI1x1ConvNet(self.local.channels, mi_units)
        self.encoding_net = MI1x1ConvNet(encoding_dim, mi_units)  # y as a 1x1 map
        self.map_net = MapEncoder(self.local.channels, mi_units) if alpha > 0 else None
        self.global_encoding_net = nn.Linear(encoding_dim, mi_units) if alpha > 0 else None
        self.discriminator = mlp([encoding_dim, 1000, 200, 1], norm="none") if gamma > 0 else None
        self._local_map: torch.Tensor | None = None

    def forward_views(self, views, network=None):
        if network is not None:
            return super().forward_views(views, network)
        if len(views) != 1:
            raise SSLError(f"Deep InfoMax takes one view per image, got {len(views)}: set data.views to one entry "
                           "with count: 1")
        maps = feature_maps(self.backbone, views[0])  # one pass: the local map and the pooled features
        self._local_map = maps[self.local.name]  # read by loss()
        return [pool(maps[self.last])]

    def extra_param_groups(self):
        if self.discriminator is None:
            return []
        return [{"params": list(self.discriminator.parameters()), "weight_decay": 0.0, "name": "prior_discriminator"}]

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        hp, fmap, self._local_map = self.hparams, self._local_map, None
        y = self.encoding(feats[0])
        terms: dict[str, torch.Tensor] = {}
        loss = y.new_zeros(())
        if hp.beta > 0:
            terms["local"] = dim_loss(self.local_net(fmap), self.encoding_net(y[:, :, None, None]).flatten(1), hp.estimator)
            loss = loss + hp.beta * terms["local"]
        if hp.alpha > 0:
            terms["global"] = dim_loss(self.map_net(fmap)[:, :, None], self.global_encoding_net(y), hp.estimator)
            loss = loss + hp.alpha * terms["global"]
        if hp.gamma > 0:
            terms["prior"], terms["prior_discriminator"] = self.prior_terms(torch.sigmoid(y))
            loss = loss + hp.gamma * terms["prior"] + terms["prior_discriminator"]
        return {"loss": loss, **terms}

    def prior_terms(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder's non-saturating loss, discriminator's loss + gradient penalty) for ``encoded`` = sigmoid(y)."""
        real = torch.rand_like(encoded).requires_grad_()
        fake = encoded.detach().requires_grad_()
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        grad_real, grad_fake = torch.autograd.grad([d_real.sum(), d_fake.sum()], [real, fake], create_graph=True)
        penalty = 0.5 * (grad_real.pow(2).sum(1).mean() + grad_fake.pow(2).sum(1).mean())
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        d_encoded = functional_call(self.discriminator, frozen, (encoded,))
        return (prior_encoder_loss(d_encoded),
                prior_discriminator_loss(d_real, d_fake) + self.hparams.prior_gradient_penalty * penalty)
