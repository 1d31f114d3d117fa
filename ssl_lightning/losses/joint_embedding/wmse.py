"""W-MSE: whitening followed by the MSE of normalised positives (Ermolov et al., "Whitening for
Self-Supervised Representation Learning", ICML 2021). Follows htdt/self-supervised methods/w_mse.py
and methods/whitening.py (``Whitening2d``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_lightning import distributed
from ssl_lightning.registry import SSLError


def cholesky_whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``W (x - mean)`` with ``W = L^{-1}``, ``L L^T = (1 - eps) Cov + eps I`` and ``Cov`` the unbiased
    covariance (``/ (n - 1)``) of the centred rows: the result has identity covariance. Differentiable
    (gradients flow through the Cholesky factor and the triangular solve). At least float32."""
    with torch.autocast(x.device.type, enabled=False):  # no bf16 matmuls under mixed precision
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp16 / bf16 -> fp32; fp64 stays
        x = x - x.mean(dim=0)
        n, d = x.shape
        eye = torch.eye(d, device=x.device, dtype=x.dtype)
        cov = (1 - eps) * (x.T @ x / (n - 1)) + eps * eye
        w = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), eye, upper=False)
        return x @ w.T


def normalized_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(a, b)`` per row (the MSE of the L2-normalised vectors)."""
    return 2 - 2 * F.cosine_similarity(a, b, dim=-1)


def check_whitening(n: int, d: int, w_size: int, per_process: int | None = None) -> None:
    world = distributed.world_size()
    where = f"the global batch ({per_process} per process x {world} processes = {n})" if world > 1 else f"the batch ({n})"
    if w_size <= d:
        raise SSLError(f"W-MSE whitens sub-batches of w_size={w_size} embeddings of dimension {d}: the covariance "
                       f"of {w_size} samples in {d} dimensions is singular unless w_size > dim. Set model.w_size "
                       f"to more than {d} (e.g. {2 * d}) or a smaller model.emb.")
    if n % w_size:
        raise SSLError(f"W-MSE splits {where} into sub-batches of w_size={w_size}, but {n} is not a multiple of "
                       f"{w_size}. Make the global batch a multiple of w_size (e.g. data.batch_size such that "
                       f"batch x processes = {max(1, n // w_size) * w_size}) or change model.w_size.")


def _permutation(n: int, device: torch.device) -> torch.Tensor:
    """A random permutation of the global batch, the same on every process (rank 0's)."""
    perm = torch.randperm(n).to(device)
    if distributed.world_size() > 1:
        dist.broadcast(perm, src=0)
    return perm


def wmse_loss(z: Sequence[torch.Tensor], w_size: int = 128, w_iter: int = 1, eps: float = 0.0,
              gather: bool = True) -> torch.Tensor:
    """``L = 1/(w_iter P) sum_iter sum_{i<j} mean_n [2 - 2 cos(w_i(n), w_j(n))]`` with ``w_i = Whiten(z_i)``
    computed per sub-batch: each iteration draws a random permutation of the N images, splits it into
    sub-batches of ``w_size`` and whitens each view's embeddings of a sub-batch separately (as the
    official ``w_mse.py``); P = V (V - 1) / 2 positive pairs of the V views.

    ``z[i]`` (N x d) are the embeddings of view i. With ``gather`` they are gathered from every process WITH
    gradient, so N is the global batch and every process computes the same loss (the gather's backward sums
    the gradients, DDP averages them: exactly the single-process gradient). The permutation is rank 0's.
    """
    per_process = z[0].shape[0]
    if gather:
        z = [distributed.gather_with_grad(v) for v in z]
    n, d = z[0].shape
    check_whitening(n, d, w_size, per_process)
    pairs = [(i, j) for i in range(len(z)) for j in range(i + 1, len(z))]
    total = 0.0
    for _ in range(w_iter):
        for idx in _permutation(n, z[0].device).view(-1, w_size):
            w = [cholesky_whiten(v[idx], eps) for v in z]
            total = total + sum(normalized_mse(w[i], w[j]).sum() for i, j in pairs)
    return total / (w_iter * len(pairs) * n)
