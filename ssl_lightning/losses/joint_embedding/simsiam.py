"""SimSiam's symmetric negative-cosine loss with stop-gradient (Chen & He, CVPR 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``D(p, z) = -cos(p, sg(z))`` averaged over the batch; only ``z`` (the projection) is detached."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``L = 1/2 D(p1, z2) + 1/2 D(p2, z1)``: each view's prediction regresses the other view's
    detached projection. Minimum -1. Purely per-sample, so no cross-process gathering is needed."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse monitor: the per-dimension std over the batch of the L2-normalised ``z``,
    averaged over dimensions and multiplied by ``sqrt(d)``: ~1 for well spread outputs (std ~ 1/sqrt(d)),
    0 when every image collapses to one vector."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean() * z.shape[1] ** 0.5
