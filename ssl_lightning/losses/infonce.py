"""InfoNCE with momentum-encoder keys: MoCo v1/v2's queue form and MoCo v3's in-batch form."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning import distributed


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v1/v2 (He et al., 2020, eq. 1): ``-log exp(q.k+/T) / (exp(q.k+/T) + sum_{k- in queue} exp(q.k-/T))``,
    mean over the batch.

    ``q`` (N, d) queries, ``k`` (N, d) their positive keys, ``queue`` (K, d) the negatives (rows already
    L2-normalised, as enqueued). ``q`` and ``k`` are L2-normalised here; keys and queue get no gradient.
    The positive is logit 0, as in moco/builder.py.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.detach().T  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def mocov3_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, gather: bool = True) -> torch.Tensor:
    """MoCo v3 (Chen, Xie & He, 2021): ``2T * CE(q k_all^T / T, labels)`` with the keys of the whole global
    batch as candidates (gathered from all processes, no gradient) and ``labels = arange(N) + N * rank``:
    the positive of query n is the key of the same image. ``q`` and ``k`` are L2-normalised here.
    Each process averages over its own queries, so DDP's gradient averaging gives the single-process
    gradient on the global batch. The ``2T`` factor is the official code's (moco-v3 builder.py).
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    n = q.shape[0]
    offset = 0
    if gather and distributed.world_size() > 1:
        k, offset = distributed.gather(k), n * distributed.rank()
    logits = q @ k.T / temperature
    labels = torch.arange(n, device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)
