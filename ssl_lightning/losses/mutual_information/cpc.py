"""CPC's InfoNCE over a grid of patch embeddings (Oord, Li & Vinyals 2018, eq. 4 and sec. 3.2; Henaff et al. 2020).

For each offset k = 1..K, the prediction ``W_k c[b, i, j]`` of context position (b, i, j) is scored against every
patch embedding ``z`` of the batch (all positions of all images, gathered from every process), the log-bilinear
score ``f = exp(z^T W_k c)``, and the loss is the cross-entropy of picking its own target ``z[b, i + k, j]``::

    L_k = -mean_{b, i < rows - k, j} log exp(p_k[b,i,j] . z[b,i+k,j]) / sum_{b', i', j'} exp(p_k[b,i,j] . z[b',i',j'])
    L   = mean_k L_k                                        (I(x_{i+k}; c_i) >= log N - L_k, N = candidates)

Each offset is counted once (Lightning-Bolts' CPC counts offset k's loss k times).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning import distributed
from ssl_lightning.registry import SSLError


def cpc_infonce(predictions: torch.Tensor, targets: torch.Tensor, gather: bool = True,
                per_offset: bool = False) -> torch.Tensor:
    """The loss above. ``predictions`` (K, B, rows, cols, D): ``predictions[k - 1, b, i, j]`` predicts
    ``targets[b, i + k, j]`` (rows ``i >= rows - k`` have no target and are not used); ``targets`` (B, rows, cols, D).
    ``gather``: under DDP the candidates are every process's targets, gathered with gradient (rank order), and each
    process averages over its own predictions: DDP's gradient averaging then gives one process's gradient on the
    global batch. Returns the mean over offsets, or the K per-offset losses if ``per_offset``.
    With K equal-score negatives per prediction (e.g. all-zero predictions: N equal candidates) the loss is ln N."""
    if predictions.ndim != 5 or predictions.shape[1:] != targets.shape:
        raise SSLError(f"cpc_infonce expects predictions (K, B, rows, cols, D) and targets (B, rows, cols, D) of the "
                       f"same grid, got {tuple(predictions.shape)} and {tuple(targets.shape)}")
    steps, b, rows, cols, d = predictions.shape
    if steps >= rows:
        raise SSLError(f"cpc_infonce: {steps} prediction steps need a grid of at least {steps + 1} rows, got {rows}: "
                       "lower the steps or use more rows (smaller stride or patch, or larger images)")
    candidates = targets.reshape(-1, d)
    offset = 0
    if gather and distributed.world_size() > 1:
        candidates, offset = distributed.gather_with_grad(candidates), b * rows * cols * distributed.rank()
    position = torch.arange(b * rows * cols, device=targets.device).view(b, rows, cols) + offset
    losses = []
    for k in range(1, steps + 1):
        p = predictions[k - 1, :, :rows - k].reshape(-1, d)  # contexts that have a target k rows below
        losses.append(F.cross_entropy(p @ candidates.T, position[:, k:].reshape(-1)))
    per_k = torch.stack(losses)
    return per_k if per_offset else per_k.mean()
