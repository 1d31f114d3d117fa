"""Virtual adversarial training (Miyato et al., TPAMI 2018; takerum/vat_tf ``vat.py``).

``r_adv = eps * normalise(grad_d KL(p(y|x) || p(y|x + xi d)))`` from a random ``d`` (one power iteration
towards the dominant eigenvector of the KL's Hessian at ``r = 0``), and the loss
``KL(p(y|x) || p(y|x + r_adv))`` with the clean prediction held fixed (summed over classes, averaged over
the batch). The caller runs the network; pass it wrapped in :func:`~ssl_lightning.semi.frozen_bn_stats` so
that neither the perturbed passes nor the clean unlabelled pass move the BatchNorm statistics.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ssl_lightning.semi.consistency import kl_consistency


def normalise_per_sample(d: Tensor) -> Tensor:
    """vat_tf ``get_normalized_vector``: ``d / max|d|`` then ``d / sqrt(1e-6 + sum d^2)``, per sample."""
    dims = tuple(range(1, d.ndim))
    d = d / (1e-12 + d.abs().amax(dim=dims, keepdim=True))
    return d / torch.sqrt(1e-6 + d.pow(2).sum(dim=dims, keepdim=True))


def adversarial_direction(network: Callable[[Tensor], Tensor], x: Tensor, clean_logits: Tensor, xi: float = 1e-6,
                          power_iterations: int = 1, d: Tensor | None = None) -> Tensor:
    """The unit-norm (per sample) direction ``normalise(grad_d KL)`` after ``power_iterations`` steps from
    ``d`` (default: Gaussian noise). No gradient reaches the network's parameters or ``x``."""
    clean = clean_logits.detach()
    d = torch.randn_like(x) if d is None else d
    for _ in range(power_iterations):
        d = (xi * normalise_per_sample(d)).requires_grad_(True)
        kl = kl_consistency(network(x.detach() + d), clean)
        (grad,) = torch.autograd.grad(kl, d)
        d = grad.detach()
    return normalise_per_sample(d)


def vat_loss(network: Callable[[Tensor], Tensor], x: Tensor, clean_logits: Tensor, eps: float = 8.0,
             xi: float = 1e-6, power_iterations: int = 1, d: Tensor | None = None) -> Tensor:
    """``KL(p(y|x) || p(y|x + r_adv))``, ``r_adv = eps * adversarial_direction(...)``; gradients flow through
    the perturbed pass only (the clean logits are detached, ``r_adv`` is a constant)."""
    r_adv = eps * adversarial_direction(network, x, clean_logits, xi, power_iterations, d)
    return kl_consistency(network(x.detach() + r_adv), clean_logits.detach())
