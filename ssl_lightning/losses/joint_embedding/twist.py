"""TWIST's objective (Wang et al., "Self-Supervised Learning by Estimating Twin Class Distributions", 2021).

For class distributions ``p = softmax(z / tau)`` (``z``: the head's batch-normalised outputs) of two views,

    L = 1/2 [KL(p1 || p2) + KL(p2 || p1)] + (1 + lambda1) mean_b H(p_b) - lambda2 H(mean_b p_b)
        consistency                       sharpness                     diversity

with ``KL(p || q) = mean_b sum_k p_bk (log(p_bk + eps) - log(q_bk + eps))`` and
``H(p) = -sum_k p_k log(p_k + eps)`` (bytedance/TWIST objective.py ``EntLoss``, ``KL``, ``EH``, ``HE``).
Sharpness and diversity are averaged over the two views (``0.5 (EH(p1) + EH(p2))``).

Distributed: consistency and sharpness are per-sample means over this process's batch (DDP's gradient
averaging turns them into global-batch means); the mean distribution of the diversity term is over the
GLOBAL batch (per-process sums gathered with gradient). Every process's loss averages to the loss of
one process on the global batch and the gradients are equal. The official code instead ``all_reduce``-SUMS
every term (and the batch mean ``mean_b p_b``) over processes: its loss is ``world_size`` times the
global-batch loss (plus ``lambda2 world_size log(world_size)`` from the summed mean, which its logger
subtracts again), and the all_reduce carries no gradient. That scaling is not reproduced here.

The official implementation applies ``tau`` to the sharpness and diversity terms only (the consistency
uses ``softmax(z)``); here ``tau`` applies to all three as in the method sheet. They coincide at the
paper's ``tau = 1``, which every config uses.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl_lightning import distributed
from ssl_lightning.registry import SSLError


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``mean_b sum_k p_bk (log(p_bk + eps) - log(q_bk + eps))`` (both arguments keep their gradient)."""
    return (p * ((p + eps).log() - (q + eps).log())).sum(dim=1).mean()


def sharpness(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean per-sample entropy ``mean_b -sum_k p_bk log(p_bk + eps)`` (minimised: confident predictions)."""
    return -(p * (p + eps).log()).sum(dim=1).mean()


def batch_mean(p: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """``mean_b p_b`` over the global batch: per-process sums gathered WITH gradient, divided by the
    total count (works for unequal per-process batches)."""
    total = p.sum(dim=0, keepdim=True)
    if not gather or distributed.world_size() == 1:
        return total[0] / p.shape[0]
    count = distributed.gather(torch.tensor([p.shape[0]], device=p.device, dtype=p.dtype)).sum()
    return distributed.gather_with_grad(total).sum(dim=0) / count


def diversity(p: torch.Tensor, eps: float = 1e-5, gather: bool = True) -> torch.Tensor:
    """Entropy of the batch-mean distribution ``H(mean_b p_b) = -sum_k m_k log(m_k + eps)`` (maximised:
    all classes used), the mean over the global batch."""
    m = batch_mean(p, gather)
    return -(m * (m + eps).log()).sum()


def _check(probs: Sequence[torch.Tensor]) -> None:
    shapes = {tuple(p.shape) for p in probs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise SSLError(f"TWIST needs (B, C) class probabilities of the same shape for every view, got "
                       f"{sorted(shapes)}. Pass softmax outputs of the class head for views of the same images.")


def _combine(consistency: torch.Tensor, sharp: torch.Tensor, div: torch.Tensor, lambda1: float,
             lambda2: float) -> dict[str, torch.Tensor]:
    loss = consistency + (1 + lambda1) * sharp - lambda2 * div
    return {"loss": loss, "consistency": consistency.detach(), "sharpness": sharp.detach(), "diversity": div.detach()}


def twist_terms(p1: torch.Tensor, p2: torch.Tensor, eps: float = 1e-5, gather: bool = True) -> tuple[torch.Tensor, ...]:
    """The three unweighted terms of one pair: symmetric KL, mean sharpness and mean diversity of the two views."""
    consistency = 0.5 * (kl_divergence(p1, p2, eps) + kl_divergence(p2, p1, eps))
    sharp = 0.5 * (sharpness(p1, eps) + sharpness(p2, eps))
    div = 0.5 * (diversity(p1, eps, gather) + diversity(p2, eps, gather))
    return consistency, sharp, div


def twist_loss(p1: torch.Tensor, p2: torch.Tensor, lambda1: float = 0.0, lambda2: float = 1.0, eps: float = 1e-5,
               gather: bool = True) -> dict[str, torch.Tensor]:
    """TWIST's loss for two views' class probabilities ``(B, C)``: ``loss`` and the unweighted
    ``consistency``, ``sharpness``, ``diversity`` (detached, for logging)."""
    _check([p1, p2])
    return _combine(*twist_terms(p1, p2, eps, gather), lambda1, lambda2)


def multicrop_pairs(n_views: int, n_global: int = 2) -> list[tuple[int, int]]:
    """The official multi-crop pairs (engine.py, no momentum encoder): every pair ``(i, j)``, ``i < j``,
    whose first view is global, i.e. the two globals together and each global with every local crop;
    local crops are not paired with each other. 2 views -> [(0, 1)]; 2 + L views -> 1 + 2L pairs."""
    return [(i, j) for i in range(min(n_global, n_views)) for j in range(i + 1, n_views)]


def multicrop_twist_loss(probs: Sequence[torch.Tensor], lambda1: float = 0.0, lambda2: float = 1.0,
                         eps: float = 1e-5, n_global: int = 2, gather: bool = True) -> dict[str, torch.Tensor]:
    """:func:`twist_loss` averaged over :func:`multicrop_pairs` (every term averaged over the pairs).
    Global and local crops enter each pair alike (both sides get gradient); a view's sharpness and
    diversity count once per pair it is in."""
    _check(probs)
    if len(probs) < 2:
        raise SSLError(f"TWIST needs at least 2 views per image, got {len(probs)}. Configure data.views with count >= 2.")
    pairs = multicrop_pairs(len(probs), n_global)
    terms = [twist_terms(probs[i], probs[j], eps, gather) for i, j in pairs]
    consistency, sharp, div = (torch.stack(t).mean() for t in zip(*terms))
    return _combine(consistency, sharp, div, lambda1, lambda2)


def teacher_twist_loss(teacher_probs: Sequence[torch.Tensor], student_probs: Sequence[torch.Tensor],
                       lambda1: float = 0.0, lambda2: float = 1.0, eps: float = 1e-5,
                       gather: bool = True) -> dict[str, torch.Tensor]:
    """With a momentum encoder (official engine.py, ViT recipe): consistency is the mean over pairs
    (teacher global crop t, student crop s != t) of ``KL(p_t^teacher || p_s)`` (teacher detached);
    sharpness and diversity are the means over all student crops, each crop weighted alike."""
    _check(list(teacher_probs) + list(student_probs))
    kls = [kl_divergence(q.detach(), student_probs[s], eps)
           for t, q in enumerate(teacher_probs) for s in range(len(student_probs)) if s != t]
    consistency = torch.stack(kls).mean()
    sharp = torch.stack([sharpness(p, eps) for p in student_probs]).mean()
    div = torch.stack([diversity(p, eps, gather) for p in student_probs]).mean()
    return _combine(consistency, sharp, div, lambda1, lambda2)


# ---- self-labelling -------------------------------------------------------------------------------------
def self_label_quantile(step: int, total_steps: int, start: float = 0.5, end: float = 0.6) -> float:
    """The official ``cosine_scheduler(start, end)`` over the self-labelling steps:
    ``end + (start - end) (1 + cos(pi step / total)) / 2`` (``start`` at step 0)."""
    if total_steps <= 0:
        return start
    progress = min(max(step, 0) / total_steps, 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def confidence_threshold(confidence: torch.Tensor, quantile: float) -> torch.Tensor:
    """The official threshold: with the confidences of the (global) batch sorted in decreasing order,
    the value at position ``min(int(quantile * N), N - 1)``. Samples STRICTLY above it are kept, i.e.
    (without ties) the ``int(quantile * N)`` most confident ones: ``quantile`` is the fraction kept."""
    if not 0.0 <= quantile <= 1.0:
        raise SSLError(f"the self-labelling quantile must be in [0, 1], got {quantile}. Check quantile_start / quantile_end.")
    ranked = confidence.sort(descending=True).values
    n = ranked.shape[0]
    return ranked[min(int(quantile * n), n - 1)]


def self_label_loss(target_probs: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], quantile: float,
                    gather: bool = True) -> dict[str, torch.Tensor]:
    """Confidence-based cross-entropy of TWIST's self-labelling stage (official engine.py, SCAN's
    ``ConfidenceBasedCE`` without class balancing).

    Per sample, the target is the argmax class of the MORE confident of the two global views
    (``target_probs[0]``, ``target_probs[1]``: the student's or the momentum teacher's probabilities,
    no gradient; ties go to view 1). Samples whose confidence (that view's max probability) is above
    :func:`confidence_threshold` of the global batch's confidences contribute
    ``CE(logits_v, target)`` for every other view ``v``: the other global view and all local crops
    (``logits``: the student's head outputs of all views, global views first). The loss is the sum
    over those views of the mean CE over the kept samples of the GLOBAL batch, divided by
    ``n_views - 1``; 0 (with gradient) if no sample is kept.

    Under DDP each process returns ``world_size * (sum of its kept CEs) / (kept samples in the global
    batch)``, so the mean over processes and the DDP-averaged gradient equal one process on the global
    batch. (The official code takes the threshold and the mean per process.)

    Returns ``loss``, ``threshold`` and ``kept`` (fraction of the global batch kept).
    """
    if len(target_probs) != 2 or len(logits) < 2:
        raise SSLError(f"self-labelling needs the two global views' probabilities and >= 2 views' logits, got "
                       f"{len(target_probs)} and {len(logits)}.")
    _check(list(target_probs) + list(logits))
    with torch.no_grad():
        conf_1, cls_1 = target_probs[0].max(dim=1)
        conf_2, cls_2 = target_probs[1].max(dim=1)
        use_1 = conf_1 > conf_2
        target = torch.where(use_1, cls_1, cls_2)
        confidence = torch.maximum(conf_1, conf_2)
        all_confidence = distributed.gather(confidence) if gather else confidence
        threshold = confidence_threshold(all_confidence, quantile)
        mask = confidence > threshold
        kept_global = (all_confidence > threshold).sum()
    other_global = torch.where(use_1[:, None], logits[1], logits[0])  # the view that did not give the target
    per_view = [other_global] + list(logits[2:])
    world = distributed.world_size() if gather else 1
    ce = torch.stack([F.cross_entropy(z[mask], target[mask], reduction="sum") for z in per_view]).sum()
    loss = world * ce / kept_global.clamp(min=1) / len(per_view)  # an empty selection sums to 0, graph kept
    kept = kept_global.float() / all_confidence.shape[0]
    return {"loss": loss, "threshold": threshold, "kept": kept}
