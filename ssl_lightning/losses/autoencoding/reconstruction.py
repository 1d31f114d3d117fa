"""Autoencoder and denoising-autoencoder reconstruction losses (Vincent et al., "Extracting and Composing Robust
Features with Denoising Autoencoders", ICML 2008; the emphasis of Vincent et al., JMLR 2010, sec. 4.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.registry import SSLError

KINDS = ("mse", "bce")


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_i w_i * l(pred_i, target_i)`` over every component of the batch (torch's / Torch7's criterion mean; the
    paper's per-example sum divided by the dimension).

    ``kind="mse"``: ``l = (pred - target)^2`` (the squared error ``||x - g(f(x))||^2``; the context encoder's L2).
    ``kind="bce"``: the cross-entropy for inputs in [0, 1] (targets must be un-normalised pixels in [0, 1]; not
    checked, which would read the device back), ``l = -[t log s(p) + (1 - t) log(1 - s(p))]`` with ``pred``
    the decoder's logits and ``s`` the sigmoid (Vincent et al. 2008's reconstruction cross-entropy).
    ``weight``: broadcastable to ``pred`` (None = 1 everywhere)."""
    if kind == "mse":
        err = (pred - target).square()
    elif kind == "bce":
        err = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    else:
        raise SSLError(f"unknown reconstruction loss {kind!r}: choose one of {', '.join(KINDS)}")
    return err.mean() if weight is None else (weight * err).mean()


def denoising_weights(corrupted: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """The emphasised denoising criterion's weights: ``alpha`` on the corrupted components, ``beta`` on the others
    (alpha = beta = 1: the plain criterion)."""
    return torch.where(corrupted, alpha, beta).to(torch.get_default_dtype())
