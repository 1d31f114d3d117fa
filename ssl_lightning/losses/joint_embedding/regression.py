"""BYOL's normalised regression loss (Grill et al., 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, sg(z))`` averaged over the batch; the target ``z`` is detached here."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()
