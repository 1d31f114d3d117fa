"""MixMatch (Berthelot et al., NeurIPS 2019; google-research/mixmatch ``mixmatch.py``).

Label guess ``q = sharpen(mean_k softmax(f(u_k)), T)`` with a stop-gradient; then MixUp of ``concat(X, U)``
with a shuffle of itself (:func:`~ssl_lightning.semi.mixup`); the losses of the mixed batches are
``L_x = mean_b CE(p_b, y'_b)`` (soft targets) and ``L_u = mean_{b, c} (q'_bc - p_bc)^2``, combined as
``L_x + lambda_u L_u`` with ``lambda_u`` ramped linearly over the first 16k steps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.semi.consistency import masked_cross_entropy, softmax_mse
from ssl_lightning.semi.sharpen import sharpen


@torch.no_grad()
def guess_labels(logits: list[Tensor], temperature: float = 0.5) -> Tensor:
    """``sharpen(mean_k softmax(logits_k), T)`` over the K augmentations' logits (each (B, C)), detached."""
    probs = torch.stack([torch.softmax(z.detach().float(), dim=1) for z in logits]).mean(dim=0)
    return sharpen(probs, temperature)


def mixmatch_loss(logits_x: Tensor, targets_x: Tensor, logits_u: Tensor, targets_u: Tensor) -> tuple[Tensor, Tensor]:
    """``(L_x, L_u)`` of the mixed batches: soft-target cross-entropy of the labelled part (mean over samples)
    and softmax MSE of the unlabelled part (mean over classes and samples)."""
    return masked_cross_entropy(logits_x, targets_x), softmax_mse(logits_u, targets_u)
