"""Colorization's loss (Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016, eq. 2 and 4):

    L(Zhat, Z) = - 1/N sum_{h,w} v(Z_hw) sum_q Z_hwq log Zhat_hwq,     v(Z_hw) = w_{argmax_q Z_hwq}

Z: the soft-encoded ab targets (the ``nn`` nearest bins, Gaussian ``sigma``), w: class-rebalancing weights
``((1 - lam) p + lam / Q)^-1`` normalised so that ``E_p[w] = 1`` (p: the empirical prior of the bins), N: the
positions of the non-gray images (an image with ``|a|, |b| <= 5`` everywhere gives no loss). Uniform predictions
give ``ln Q`` times the mean weight (exactly ``ln Q`` with ``lam = 1``: every weight 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.pretext.color import GRAY_THRESHOLD, LAMBDA, SIGMA, non_gray_mask, rebalance_weights, soft_encode


def colorization_loss(logits: torch.Tensor, ab: torch.Tensor, bins: torch.Tensor, prior: torch.Tensor,
                      lam: float = LAMBDA, nn: int = 5, sigma: float = SIGMA,
                      gray_threshold: float = GRAY_THRESHOLD) -> torch.Tensor:
    """``logits`` (B, Q, h, w) over the ``bins`` (Q, 2), ``ab`` (B, 2, h, w) the targets at the prediction's grid,
    ``prior`` (Q,) bin counts or probabilities. ``nn = 5`` the paper's neighbours (the official training code: 10)."""
    target = soft_encode(ab, bins, nn, sigma)
    weight = rebalance_weights(prior.to(logits), lam)[target.argmax(dim=1)]  # v(Z_hw): the weight of the argmax bin
    ce = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)  # (B, h, w)
    keep = non_gray_mask(ab, gray_threshold)
    if not keep.any():
        return logits.sum() * 0.0  # an all-gray batch: no loss (but a graph, for the optimizer step)
    return (weight * ce)[keep].mean()
