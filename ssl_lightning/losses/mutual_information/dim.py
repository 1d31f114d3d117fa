"""Deep InfoMax's objectives (Hjelm et al., "Learning Deep Representations by Mutual Information Estimation and
Maximization", ICLR 2019), as the official code computes them (rdevon/DIM ``functions/gan_losses.py``,
``functions/dim_losses.py``, ``models/prior_matching.py``).

Scores T are dot products of MI-network outputs: ``T[i, j, p] = g_i . l_{j,p}`` between image i's global vector
and position p of image j's local map. Positives: j = i; negatives: every position of every other image. Each
estimator is returned as a LOSS (the negated lower bound on the mutual information)::

    JSD      E_neg[softplus(T) - log 2] - E_pos[log 2 - softplus(-T)]        0 at T = 0
    DV       (log mean_neg exp T) - E_pos[T]                                 0 for any constant T
    InfoNCE  -mean over (i, p) of log softmax([T_pos, T_negs])[0]             ln(K + 1) for K equal-score negatives
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ssl_lightning import distributed
from ssl_lightning.registry import SSLError

LOG2 = math.log(2.0)
#: the official InfoNCE masks an image's own (non-positive) positions with this logit, not -inf (dim_losses.py)
SELF_LOGIT = -10.0


def jsd_mi_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon estimator (``get_positive_expectation`` / ``get_negative_expectation``, measure ``JSD``):
    ``E_neg[softplus(T) - log 2] - E_pos[log 2 - softplus(-T)]`` over all positive and all negative scores."""
    return (F.softplus(neg) - LOG2).mean() - (LOG2 - F.softplus(-pos)).mean()


def dv_mi_loss(pos: torch.Tensor, neg: torch.Tensor, across_processes: bool = False) -> torch.Tensor:
    """Donsker-Varadhan estimator: ``log mean_neg exp(T) - E_pos[T]``, the log-mean-exp taken stably as
    ``logsumexp - log N`` over ALL negative scores jointly (as ``donsker_varadhan_loss``; its ``+1e-6`` inside the
    log is left out). ``across_processes``: the log-mean-exp is over the negatives of every process (each
    process's logsumexp gathered with gradient), so the per-process losses average to the global-batch loss."""
    lse, count = torch.logsumexp(neg.reshape(-1), dim=0), neg.numel()
    if across_processes and distributed.world_size() > 1:
        lse = torch.logsumexp(distributed.gather_with_grad(lse[None]), dim=0)
        count *= distributed.world_size()  # equal shapes on every process (DDP's equal batches)
    return lse - math.log(count) - pos.mean()


def infonce_mi_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """InfoNCE: ``-mean_a log exp(T_a+) / (exp(T_a+) + sum_k exp(T_ak))`` for ``pos`` (A,) and ``neg`` (A, K)."""
    logits = torch.cat([pos[:, None], neg], dim=1)
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def dim_scores(local: torch.Tensor, glob: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``T[i, j, p] = glob_i . local_{j,p}`` for ``glob`` (n, D) and ``local`` (N, D, P) (or (N, D, H, W)), with
    image i's own local map at row ``offset + i`` of ``local``. Returns ``(scores (n, N, P), positive mask (n, N))``."""
    local = local.flatten(2)
    if local.shape[1] != glob.shape[1] or offset + glob.shape[0] > local.shape[0]:
        raise SSLError(f"dim_scores: local maps {tuple(local.shape)} and global vectors {tuple(glob.shape)} do not fit "
                       f"(offset {offset}): both must come from MI networks of the same width, one map per vector")
    scores = torch.einsum("id,jdp->ijp", glob, local)
    mask = torch.zeros(glob.shape[0], local.shape[0], dtype=torch.bool, device=glob.device)
    mask[torch.arange(glob.shape[0]), offset + torch.arange(glob.shape[0])] = True
    return scores, mask


def _jsd(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return jsd_mi_loss(scores[mask], scores[~mask])


def _dv(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dv_mi_loss(scores[mask], scores[~mask], across_processes=True)


def _infonce(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Anchors (i, p): T[i, i, p] against all positions of the other images, the own other positions at -10."""
    pos = scores[mask]  # (n, P)
    neg = scores.masked_fill(mask[:, :, None], SELF_LOGIT).flatten(1)  # (n, N * P): the same set for every p
    # infonce_mi_loss(pos.flatten(), neg.repeat_interleave(P, 0)) without the (n P, N P) copy: log-softmax of the
    # positive = T+ - log(exp T+ + sum_neg exp T), the negatives' logsumexp computed once per image
    return -(pos - torch.logaddexp(pos, torch.logsumexp(neg, dim=1, keepdim=True))).mean()


#: estimator name -> loss on (scores (n, N, P), positive mask (n, N))
DIM_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "jsd": _jsd, "dv": _dv, "infonce": _infonce}


def dim_loss(local: torch.Tensor, glob: torch.Tensor, estimator: str = "jsd", gather: bool = True) -> torch.Tensor:
    """Deep InfoMax's objective between each image's global vector ``glob`` (n, D) and the positions of local maps
    ``local`` (n, D, H, W) or (n, D, P) (P = 1: the global objective), by ``estimator`` (``jsd``, ``dv``,
    ``infonce``). ``gather``: under DDP the local maps of all processes are gathered with gradient, so the
    negatives are the other images of the GLOBAL batch, and each process scores its own global vectors: the
    per-process losses average to the loss of one process on the global batch. Scores in float32."""
    if estimator not in DIM_ESTIMATORS:
        raise SSLError(f"Unknown Deep InfoMax estimator {estimator!r}: choose one of {sorted(DIM_ESTIMATORS)}")
    offset = 0
    if gather and distributed.world_size() > 1:
        local, offset = distributed.gather_with_grad(local.contiguous()), glob.shape[0] * distributed.rank()
    if local.shape[0] < 2:
        raise SSLError("Deep InfoMax needs at least 2 images per (global) batch: the negatives are the other images")
    with torch.autocast(glob.device.type, enabled=False):
        scores, mask = dim_scores(local.float(), glob.float(), offset)
        return DIM_ESTIMATORS[estimator](scores, mask)


def prior_discriminator_loss(d_prior: torch.Tensor, d_encoded: torch.Tensor) -> torch.Tensor:
    """The prior discriminator's loss (measure ``GAN``): ``-(E_P[-softplus(-D)] - E_Q[softplus(D)])``, real = prior
    samples, fake = the (detached) encoder outputs; the official gradient penalty is added by the caller."""
    return F.softplus(-d_prior).mean() + F.softplus(d_encoded).mean()


def prior_encoder_loss(d_encoded: torch.Tensor) -> torch.Tensor:
    """The encoder's prior-matching loss, non-saturating: ``-E_Q[-softplus(-D)] = E_Q[softplus(-D)]``."""
    return F.softplus(-d_encoded).mean()
