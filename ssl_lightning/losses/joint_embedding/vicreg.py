"""VICReg: Variance-Invariance-Covariance Regularization (Bardes, Ponce & LeCun, ICLR 2022).

The three terms are plain functions so that a test or another method can use one alone. The formula
follows the official ``facebookresearch/vicreg`` ``main_vicreg.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning import distributed
from ssl_lightning.losses.joint_embedding.barlow_twins import check_embeddings, off_diagonal


def invariance_loss(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """``s(Z, Z') = MSE(z, z')``: mean over samples AND dimensions of the squared difference."""
    return F.mse_loss(z_a, z_b)


def variance_loss(z: torch.Tensor, eps: float = 1e-4, gamma: float = 1.0) -> torch.Tensor:
    """``v(Z) = mean_j relu(gamma - sqrt(Var(z_j) + eps))``, unbiased variance over the batch."""
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """``c(Z) = sum_{i != j} Cov(Z)_ij^2 / d`` with ``Cov(Z) = (Z - mean)^T (Z - mean) / (N - 1)``."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4, gather: bool = True) -> dict[str, torch.Tensor]:
    """``lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]`` (lambda, mu, nu = sim/std/cov_coeff).

    As in the official code the two views' variance terms are AVERAGED (``/ 2``) while their
    covariance terms are SUMMED (the paper's equation sums both). The invariance term uses this
    process's batch; variance and covariance use the batch gathered from every process WITH gradient.
    Under DDP the mean over processes of the returned loss is the single-process loss on the global
    batch and the gradients match it exactly.

    Returns a dict: ``loss`` and the unweighted ``invariance``, ``variance``, ``covariance`` terms.
    """
    if z_a.shape != z_b.shape:
        check_embeddings(z_a, z_b, "VICReg")
    inv = invariance_loss(z_a, z_b)
    if gather:
        z_a, z_b = distributed.gather_with_grad(z_a), distributed.gather_with_grad(z_b)
    check_embeddings(z_a, z_b, "VICReg")
    var = (variance_loss(z_a, eps) + variance_loss(z_b, eps)) / 2
    cov = covariance_loss(z_a) + covariance_loss(z_b)
    loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    return {"loss": loss, "invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
