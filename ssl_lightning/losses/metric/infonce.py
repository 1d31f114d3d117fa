"""InfoNCE (Oord, Li & Vinyals, 2018): the general form with a configurable set of negatives, and its
momentum-encoder special cases, MoCo v1/v2's queue form and MoCo v3's in-batch form."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning import distributed
from ssl_lightning.registry import SSLError


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.1, normalize: bool = True) -> torch.Tensor:
    """CPC's InfoNCE (Oord et al., 2018, eq. 4): ``-E log f(x+, c) / sum_{x in X} f(x, c)``, with the positive
    INSIDE the denominator's set X, ``f(x, c) = exp(s(c, x) / T)`` and ``s`` the cosine similarity
    (``normalize``; the dot product otherwise: CPC's log-bilinear score with W folded into the anchor).

    ``anchor`` (N, d) holds the contexts c, ``positive`` (N, d) their positives. The negatives are
    * ``None``: in-batch, the other rows' positives (X = all N positives; N - 1 negatives per anchor);
    * a tensor (K, d): the same K negatives for every anchor (e.g. a memory bank or queue);
    * a tensor (N, K, d): K negatives of each anchor's own.
    Returns the mean over the N anchors; no gradient is stopped here (detach keys or a bank yourself).
    With K negatives scoring as the positive the loss is ``ln(K + 1)``, and ``I(x; c) >= ln |X| - loss``.
    MoCo's ``moco_infonce(q, k, queue, T)`` is ``info_nce(q, k.detach(), queue, T)``.
    """
    if anchor.ndim != 2 or anchor.shape != positive.shape:
        raise SSLError(f"info_nce expects anchor and positive of the same shape (N, d), got {tuple(anchor.shape)} and "
                       f"{tuple(positive.shape)}: pass one positive per anchor")
    n, d = anchor.shape
    if negatives is not None and not (negatives.shape[-1] == d and (
            negatives.ndim == 2 or (negatives.ndim == 3 and negatives.shape[0] == n))):
        raise SSLError(f"info_nce: negatives of shape {tuple(negatives.shape)} do not fit anchors "
                       f"{tuple(anchor.shape)}: pass None (in-batch), shared negatives (K, {d}) or per-anchor negatives ({n}, K, {d})")
    if normalize:
        anchor, positive = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    if negatives is None:
        logits = anchor @ positive.T  # row i: its positive at column i, the other positives elsewhere
        target = torch.arange(n, device=anchor.device)
    else:
        l_pos = (anchor * positive).sum(dim=1, keepdim=True)
        l_neg = anchor @ negatives.T if negatives.ndim == 2 else torch.einsum("nd,nkd->nk", anchor, negatives)
        logits = torch.cat([l_pos, l_neg], dim=1)  # the positive is candidate 0
        target = torch.zeros(n, dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits / temperature, target)


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
