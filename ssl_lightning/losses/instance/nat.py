"""Noise As Targets (Bojanowski & Joulin, "Unsupervised Learning by Predicting Noise", ICML 2017; no official code):
unit-norm features regressed onto fixed random unit vectors, one per image, with the image-to-target assignment
re-solved per mini-batch by the Hungarian algorithm."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ssl_lightning.registry import SSLError


@torch.no_grad()
def nat_assign(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` of the batch's own targets that maximises ``sum_j f_j . c_perm[j]`` (for unit-norm
    rows: minimises ``sum_j ||f_j - c_perm[j]||^2``): image j of the batch takes target row ``perm[j]``.

    ``features`` and ``targets`` are (B, d); solved exactly with ``scipy.optimize.linear_sum_assignment``. Non-finite
    similarities (a NaN feature, from a step that ``on_nonfinite=skip`` drops) count as the lowest, so the result
    stays a permutation."""
    if features.shape != targets.shape or features.dim() != 2:
        raise SSLError(f"nat_assign needs (B, d) features and (B, d) targets, one target per image of the batch; got "
                       f"{tuple(features.shape)} and {tuple(targets.shape)}")
    sim = (features.double() @ targets.double().T).cpu().numpy()
    sim = np.nan_to_num(sim, nan=-2.0, posinf=-2.0, neginf=-2.0)  # a non-finite feature (skipped step): any target
    rows, cols = linear_sum_assignment(sim, maximize=True)
    perm = torch.empty(features.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm.to(features.device)


def nat_loss(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_j ||f_j - c_j||^2``: squared distance of each (unit-norm) feature to its assigned target (B, d)."""
    if features.shape != targets.shape:
        raise SSLError(f"nat_loss needs one target per feature row, got {tuple(features.shape)} and "
                       f"{tuple(targets.shape)}")
    return (features - targets).pow(2).sum(dim=1).mean()
