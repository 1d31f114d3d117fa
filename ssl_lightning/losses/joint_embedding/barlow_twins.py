"""Barlow Twins' redundancy-reduction loss (Zbontar et al., ICML 2021)."""
from __future__ import annotations

import torch

from ssl_lightning import distributed
from ssl_lightning.registry import SSLError


def batch_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``BatchNorm1d(affine=False)`` in training mode: ``(z - mean) / sqrt(var + eps)`` per dimension,
    biased variance over the batch (what the official code's SyncBatchNorm does on the global batch)."""
    z = z - z.mean(dim=0)
    return z / torch.sqrt(z.pow(2).mean(dim=0) + eps)


def check_embeddings(z_a: torch.Tensor, z_b: torch.Tensor, method: str) -> None:
    """Batch statistics need two same-shaped (N, d) embeddings with N >= 2."""
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise SSLError(f"{method} needs two embeddings of the same shape (N, d); got {tuple(z_a.shape)} and "
                       f"{tuple(z_b.shape)}. Pass the projections of two views of the same images.")
    if z_a.shape[0] < 2:
        raise SSLError(f"{method} normalises over the batch, so it needs at least 2 samples per step (global "
                       f"batch), got {z_a.shape[0]}. Increase data.batch_size (or drop the last incomplete batch).")


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 0.0051, gather: bool = True) -> torch.Tensor:
    """``L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` with ``C = BN(z_a)^T BN(z_b) / N``.

    ``N`` is the GLOBAL batch: with ``gather`` the embeddings of every process are gathered WITH
    gradient (``distributed.gather_with_grad``) before the batch normalisation, so the mean and
    variance are global-batch statistics and every process computes the same loss, the loss of one
    process on the global batch. The gather's backward sums the gradients over processes and DDP
    averages them, so the gradient is exactly the single-process one: it does NOT shrink with the
    number of processes (an ``all_reduce`` of ``C`` outside autograd would scale it by 1/world_size).
    """
    if gather:
        z_a, z_b = distributed.gather_with_grad(z_a), distributed.gather_with_grad(z_b)
    check_embeddings(z_a, z_b, "Barlow Twins")
    n = z_a.shape[0]
    c = batch_standardize(z_a).T @ batch_standardize(z_b) / n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    return on_diag + lambd * off_diagonal(c).pow(2).sum()
