"""SwAV's swapped prediction with Sinkhorn-Knopp codes (Caron et al., "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments", NeurIPS 2020). Follows facebookresearch/swav main_swav.py
(``distributed_sinkhorn`` and the loss in ``train``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_lightning import distributed


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, gather: bool = True) -> torch.Tensor:
    """Codes ``Q`` (B x K) of the scores ``z . C`` (B x K) by Sinkhorn-Knopp on ``exp(scores / eps)``.

    Equipartition over the GLOBAL batch: with ``gather`` the total, the prototype (row) sums and ``B``
    are taken over all processes (all-reduced), so every process gets its rows of the codes that one
    process would compute on the global batch. Each column (sample) of the returned codes sums to 1;
    each prototype receives ``B / K`` of the mass. Computed in float32, without gradient.
    """
    reduce = gather and distributed.world_size() > 1
    Q = torch.exp(scores.float() / epsilon).T  # K x B_local
    K, B = Q.shape[0], Q.shape[1] * (distributed.world_size() if reduce else 1)
    total = Q.sum()
    if reduce:
        dist.all_reduce(total)
    Q /= total
    for _ in range(iterations):
        rows = Q.sum(dim=1, keepdim=True)  # each prototype's total weight must be 1/K
        if reduce:
            dist.all_reduce(rows)
        Q /= rows
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample's total weight must be 1/B
        Q /= B
    Q *= B  # columns sum to 1: an assignment per sample
    return Q.T


def swapped_prediction(q: torch.Tensor, scores: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``-mean_b sum_k q_bk log softmax(scores_b / T)_k``: predict the code ``q`` of one crop from another crop's scores."""
    return -(q * F.log_softmax(scores / temperature, dim=1)).sum(dim=1).mean()


def swav_loss(
    scores: Sequence[torch.Tensor],
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    queue_scores: Sequence[torch.Tensor] | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """SwAV loss over multi-crop scores ``scores[s] = z_s . C`` (each B x K):

    ``L = 1/|A| sum_{t in A} 1/(S-1) sum_{s != t} swapped_prediction(q_t, scores[s])``, A = ``crops_for_assign``,
    S = number of crops, ``q_t = sinkhorn(scores[t])`` (detached). ``queue_scores[i]`` (optional) are the
    scores of queued features for assigned crop ``A[i]``: they join the Sinkhorn problem and only the
    batch's codes are kept.
    """
    total = scores[0].new_zeros(())
    for i, t in enumerate(crops_for_assign):
        with torch.no_grad():
            out = scores[t].detach()
            if queue_scores is not None:
                out = torch.cat([queue_scores[i].detach(), out])
            q = sinkhorn(out, epsilon, iterations, gather)[-scores[t].shape[0]:]
        subloss = sum(swapped_prediction(q, scores[s], temperature) for s in range(len(scores)) if s != t)
        total = total + subloss / (len(scores) - 1)
    return total / len(crops_for_assign)
