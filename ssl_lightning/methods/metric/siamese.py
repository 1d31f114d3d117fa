"""A Siamese embedding trained with a metric loss (Hadsell et al. 2006; Gutmann & Hyvarinen 2010; Oord et al.
2018; Frosst et al. 2019) on instance pairs (two views of an image) or, given labels, on label pairs (the
supervised-contrastive use)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.heads import mlp
from ssl_lightning.losses.metric.contrastive_margin import contrastive_margin_loss
from ssl_lightning.losses.metric.infonce import info_nce
from ssl_lightning.losses.metric.nce import nce_loss
from ssl_lightning.losses.metric.soft_nearest_neighbour import soft_nearest_neighbour_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.registry import SSLError

LOSSES = ("contrastive_margin", "nce", "info_nce", "soft_nearest_neighbour")
PAIRS = ("instances", "labels")


@METHODS.register("siamese")
class Siamese(SSLMethod):
    """One network (backbone + embedding head ``g``) applied to both views, ``z1 = g(f(v1))``, ``z2 = g(f(v2))``
    (N images each), and one of four metric losses on the pairs ``(z1_i, z2_j)``. A pair is POSITIVE when
    ``pairs: instances``: ``i == j`` (two views of one image); ``pairs: labels``: ``y_i == y_j`` (same class,
    every image labelled; the supervised-contrastive use). How each loss is fed:

    * ``contrastive_margin``: all N^2 cross-view pairs, ``similar`` = positive, mean over pairs
      (:func:`contrastive_margin_loss`, margin ``margin``). In instance mode only N of the N^2 are similar.
    * ``nce``: the candidates of anchor ``z1_i`` are the N second views; ``ln p_model(j | i) = z1_i . z2_j / T
      - ln Z`` with ``ln Z`` a learned scalar (NCE estimates the normaliser); the NOISE distribution is uniform
      over the batch's N candidates, ``p_noise = 1 / N`` (Wu et al. 2018's uniform instance noise): the
      positive pairs are the data samples, the other pairs the noise samples, ``nu = T_n / T_d`` (N - 1 in
      instance mode). Both directions (z1 anchors, z2 anchors), averaged.
    * ``info_nce``: in-batch negatives, cosine scores at temperature T, both directions averaged. Instance
      mode: ``info_nce(z1, z2)`` (the N - 1 other second views are the negatives). Label mode: one InfoNCE
      term per positive pair (i, p), its denominator all N candidates (the positive inside), mean over
      positive pairs (SupCon's L_out weights anchors equally instead: the same for balanced classes).
    * ``soft_nearest_neighbour``: the 2N embeddings ``[z1; z2]`` with labels = instance ids (``arange(N)``
      twice) or the class labels twice, squared Euclidean distance, temperature T.

    Pairs are formed within each process's batch (no gathering across processes: with DDP the negatives
    are the local batch's).

    Args:
        loss: one of ``contrastive_margin``, ``nce``, ``info_nce``, ``soft_nearest_neighbour``.
        pairs: ``instances`` or ``labels`` (needs a labelled training set: label -1 is refused).
        temperature: T of ``nce``, ``info_nce`` and ``soft_nearest_neighbour``.
        margin: m of ``contrastive_margin``.
        normalize: L2-normalise the embeddings (``info_nce`` always compares cosines); on the unit sphere
            distances are at most 2, so keep ``margin < 2``.
        proj_hidden, proj_out: the embedding head's widths (``D -> proj_hidden -> proj_out``).
        **kwargs: :class:`SSLMethod` options.
    """

    def __init__(self, loss: str = "info_nce", pairs: str = "instances", temperature: float = 0.1, margin: float = 1.0,
                 normalize: bool = True, proj_hidden: int = 512, proj_out: int = 128, **kwargs) -> None:
        if loss not in LOSSES:
            raise SSLError(f"Siamese: unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
        if pairs not in PAIRS:
            raise SSLError(f"Siamese: unknown pairs {pairs!r}; use instances (two views of an image) or labels")
        super().__init__(**kwargs)
        self.head = mlp([self.backbone.num_features, proj_hidden, proj_out])
        self.log_z = nn.Parameter(torch.zeros(())) if loss == "nce" else None  # NCE's learned log-normaliser
        self.batch_labels: torch.Tensor | None = None  # the training batch's labels (label mode), set per step

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.pairs == "labels" and not int(getattr(self.trainer.datamodule, "num_classes", 0) or 0):
            raise SSLError("Siamese with pairs: labels needs a labelled training set, and this dataset has no classes: "
                           "use pairs: instances, or a labelled dataset")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.batch_labels = batch[1]
        return super().training_step(batch, batch_idx)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        if len(feats) < 2:
            raise SSLError(f"Siamese needs two views per image, got {len(feats)}: set data.views with count: 2")
        labels = None
        if self.hparams.pairs == "labels":
            labels = self.batch_labels
            if labels is None or bool((labels < 0).any()):
                n = "no" if labels is None else int((labels < 0).sum())
                raise SSLError(f"Siamese with pairs: labels got {n} unlabelled images (label -1) in a training batch: "
                               "label pairs need every image labelled; use pairs: instances, or a labelled split")
        z1, z2 = self.head(torch.cat(feats[:2])).chunk(2)  # one pass: BatchNorm statistics over both views
        return self.pair_loss(z1, z2, labels)

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The configured loss on the embeddings (N, d) of the two views; ``labels`` (N,) for label pairs."""
        hp = self.hparams
        n = z1.shape[0]
        if hp.normalize:
            z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        ids = torch.arange(n, device=z1.device) if labels is None else labels
        positive = ids[:, None] == ids[None, :]  # (anchor i of view 1, candidate j of view 2)
        if hp.loss == "contrastive_margin":
            return contrastive_margin_loss(z1.repeat_interleave(n, 0), z2.repeat(n, 1), positive.flatten(), hp.margin)
        if hp.loss == "soft_nearest_neighbour":
            return soft_nearest_neighbour_loss(torch.cat([z1, z2]), ids.repeat(2), hp.temperature)
        if hp.loss == "info_nce":
            if labels is None:
                return 0.5 * (info_nce(z1, z2, None, hp.temperature) + info_nce(z2, z1, None, hp.temperature))
            logits = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / hp.temperature
            return 0.5 * (_multi_positive_info_nce(logits, positive) + _multi_positive_info_nce(logits.T, positive.T))
        scores = z1 @ z2.T / hp.temperature
        return 0.5 * (self._nce(scores, positive) + self._nce(scores.T, positive.T))

    def _nce(self, scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        log_p_model = scores - self.log_z
        data, noise = log_p_model[positive], log_p_model[~positive]
        log_noise = -math.log(scores.shape[1])  # uniform over the N candidates
        return nce_loss(log_p_model_data=data, log_p_noise_data=torch.full_like(data, log_noise),
                        log_p_model_noise=noise, log_p_noise_noise=torch.full_like(noise, log_noise))


def _multi_positive_info_nce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over the positive pairs (i, p) of ``-logits[i, p] + logsumexp_a logits[i, a]``: InfoNCE for every
    positive with all of the anchor's candidates in the denominator."""
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_prob[positive].mean()
