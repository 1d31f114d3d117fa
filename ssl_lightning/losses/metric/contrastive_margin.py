"""Contrastive loss with a margin (Hadsell, Chopra & LeCun, CVPR 2006, "Dimensionality Reduction by Learning an
Invariant Mapping", eq. 4): pull similar pairs together, push dissimilar pairs at least a margin apart."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.registry import SSLError

REDUCTIONS = ("mean", "sum", "none")


def contrastive_margin_loss(z1: torch.Tensor, z2: torch.Tensor, similar: torch.Tensor, margin: float = 1.0,
                            eps: float = 1e-8, reduction: str = "mean") -> torch.Tensor:
    """``L = (1 - Y) 1/2 D^2 + Y 1/2 max(0, m - D)^2`` per pair, ``D = sqrt(||z1 - z2||^2 + eps)``.

    Convention: the paper's ``Y = 0`` marks a SIMILAR pair and ``Y = 1`` a dissimilar one; to avoid a
    silent flip of that convention this function takes ``similar``, a bool tensor (N,) that is True for
    similar pairs (i.e. ``Y = ~similar``). ``z1``, ``z2`` (N, d) are the two embeddings of each pair (not
    normalised here). ``eps`` inside the square root keeps the gradient of D finite at ``z1 == z2``.
    ``reduction``: "mean" over the N pairs (the default, batch-size independent), "sum" (the paper's sum
    over pairs) or "none" (the N per-pair losses).

    Example::

        loss = contrastive_margin_loss(f(x1), f(x2), similar=(y1 == y2), margin=1.0)
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise SSLError(f"contrastive_margin_loss expects z1 and z2 of the same shape (N, d), got {tuple(z1.shape)} "
                       f"and {tuple(z2.shape)}: pass one row per pair")
    if similar.dtype != torch.bool or similar.shape != z1.shape[:1]:
        raise SSLError(f"contrastive_margin_loss expects `similar` as a bool tensor of shape ({z1.shape[0]},), got "
                       f"{similar.dtype} {tuple(similar.shape)}: pass True for similar pairs (Hadsell's Y = 0), e.g. "
                       "similar=(labels1 == labels2)")
    if reduction not in REDUCTIONS:
        raise SSLError(f"contrastive_margin_loss: unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    d = torch.sqrt((z1 - z2).pow(2).sum(dim=1) + eps)
    y = (~similar).to(d.dtype)  # Hadsell's Y: 1 for dissimilar pairs
    per_pair = (1 - y) * 0.5 * d.pow(2) + y * 0.5 * F.relu(margin - d).pow(2)
    if reduction == "none":
        return per_pair
    return per_pair.sum() if reduction == "sum" else per_pair.mean()
