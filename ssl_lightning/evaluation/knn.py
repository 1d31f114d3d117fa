"""Weighted kNN classification (Wu et al., 2018), with bounded memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def weighted_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class per query: the top-k cosine neighbours vote with weight ``exp(s / T)``.

    Queries are processed ``chunk_size`` at a time against bank chunks of ``16 * chunk_size`` rows,
    keeping a running top-k, so memory stays O(chunk_size * (16 * chunk_size + k)) whatever the
    bank size. Bank rows labelled -1 are ignored.
    """
    keep = train_labels >= 0
    bank, bank_labels = F.normalize(train_features[keep].float(), dim=1), train_labels[keep]
    queries = F.normalize(query_features.float(), dim=1)
    k = min(k, bank.shape[0])
    bank_chunk = 16 * chunk_size
    preds = []
    for q in queries.split(chunk_size):
        top_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        top_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for start in range(0, bank.shape[0], bank_chunk):
            sims = q @ bank[start:start + bank_chunk].T
            s, i = torch.cat([top_s, sims], 1), torch.cat([top_i, torch.arange(start, start + sims.shape[1], device=q.device).expand_as(sims)], 1)
            top_s, pos = s.topk(min(k, s.shape[1]), dim=1)
            top_i = i.gather(1, pos)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[top_i], (top_s / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)
