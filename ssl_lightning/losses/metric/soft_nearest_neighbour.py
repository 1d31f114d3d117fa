"""Soft nearest neighbour loss (Frosst, Papernot & Hinton, ICML 2019, eq. 1; reference code: cleverhans
``SNNLCrossEntropy``): how entangled the classes are in a representation -- low when each point's
neighbours, weighted by a Gaussian-like kernel, are of its own class."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_lightning.registry import SSLError

DISTANCES = ("squared_euclidean", "cosine")
STABILITY_EPS = 1e-5  # cleverhans' SNNLCrossEntropy.STABILITY_EPS


def pairwise_distance(x: torch.Tensor, distance: str = "squared_euclidean") -> torch.Tensor:
    """(b, b) distances between the rows of ``x``: the SQUARED Euclidean distance (the paper's) or the cosine
    distance ``1 - cos``."""
    if distance == "squared_euclidean":
        sq = x.pow(2).sum(dim=1)
        return (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0)
    if distance == "cosine":
        z = F.normalize(x, dim=1)
        return 1 - z @ z.T
    raise SSLError(f"soft_nearest_neighbour_loss: unknown distance {distance!r}; use one of {', '.join(DISTANCES)}")


def soft_nearest_neighbour_loss(x: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor,
                                distance: str = "squared_euclidean", eps: float = STABILITY_EPS) -> torch.Tensor:
    """``-1/b sum_i log(eps + sum_{j != i, y_j = y_i} e^{-d_ij / T} / (eps + sum_{k != i} e^{-d_ik / T}))``.

    ``x`` (b, ...) is flattened to (b, d) (a layer's activations, as the reference code does); ``labels``
    (b,) the classes; ``d`` the squared Euclidean (default) or cosine distance; the diagonal ``k = i`` is
    removed. ``eps`` is the reference code's 1e-5, added in the ratio's denominator and inside the log
    (so an anchor with no same-class partner contributes ``-log eps`` rather than infinity); ``eps = 0``
    gives the paper's formula (pytorch-metric-learning's ``NCALoss`` with ``softmax_scale = 1 / T``, which
    drops such anchors instead). ``temperature`` may be a tensor (the paper optimises it). Computed in
    log space, so large ``d / T`` does not underflow.
    """
    if x.ndim < 2 or labels.shape != x.shape[:1]:
        raise SSLError(f"soft_nearest_neighbour_loss expects x (b, ...) and labels (b,), got {tuple(x.shape)} and "
                       f"{tuple(labels.shape)}: pass one label per row")
    b = x.shape[0]
    if b < 2:
        raise SSLError(f"soft_nearest_neighbour_loss needs at least 2 samples, got {b}: use a larger batch")
    logits = -pairwise_distance(x.reshape(b, -1), distance) / temperature
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=x.device)
    same = (labels[:, None] == labels[None, :]) & off_diagonal
    has_partner = same.any(dim=1)
    neg_inf = torch.finfo(logits.dtype).min  # finite, so rows without a partner give no NaN gradient
    log_all = torch.logsumexp(logits.masked_fill(~off_diagonal, neg_inf), dim=1)
    log_same = torch.logsumexp(logits.masked_fill(~same, neg_inf), dim=1)
    if eps > 0:
        log_eps = torch.full_like(log_all, math.log(eps))
        log_ratio = log_same - torch.logaddexp(log_eps, log_all)
        log_ratio = torch.where(has_partner, log_ratio, torch.full_like(log_ratio, -math.inf))
        return -torch.logaddexp(log_eps, log_ratio).mean()
    if not bool(has_partner.all()):
        raise SSLError("soft_nearest_neighbour_loss with eps=0 needs every sample to have a same-class partner in the "
                       "batch (the loss is infinite otherwise): use eps > 0 or batches with >= 2 samples per class")
    return -(log_same - log_all).mean()
