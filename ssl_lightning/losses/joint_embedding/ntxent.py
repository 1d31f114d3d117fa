"""NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (Chen et al., 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning import distributed


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """Mean over all 2N views of ``-log exp(cos(z_i, z_j)/T) / sum_{k != i} exp(cos(z_i, z_k)/T)``.

    ``z_a[n]`` and ``z_b[n]`` are the two views of image n. With ``gather`` the negatives are the
    views of the whole global batch, gathered across processes with gradient; each process averages
    over its own anchors, so DDP's gradient averaging gives exactly the single-process gradient.
    (The official TF code sums the two directions, i.e. twice this value.)
    """
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)  # local anchors: [a_0..a_{n-1}, b_0..b_{n-1}]
    if gather and distributed.world_size() > 1:
        world, r = distributed.world_size(), distributed.rank()
        za_all = distributed.gather_with_grad(z[:n])
        zb_all = distributed.gather_with_grad(z[n:])
        candidates = torch.cat([za_all, zb_all])  # [A (world*n), B (world*n)]
        offset, total = r * n, world * n
    else:
        candidates, offset, total = z, 0, n
    logits = z @ candidates.T / temperature
    local = torch.arange(n, device=z.device) + offset
    self_idx = torch.cat([local, local + total])
    positive = torch.cat([local + total, local])
    logits[torch.arange(2 * n, device=z.device), self_idx] = float("-inf")  # exclude k == i
    return F.cross_entropy(logits, positive)
