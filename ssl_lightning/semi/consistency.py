"""Unlabelled losses as plain functions: consistency (Pi-model, Mean Teacher, MixMatch, VAT), entropy
(EntMin) and masked cross-entropy (Pseudo-label, FixMatch).

Conventions from the official code (see the method sheet): the softmax MSE is averaged over classes AND
samples (tempens, mean-teacher ``softmax_mse_loss`` / C / B, mixmatch ``reduce_mean``); VAT's KL is summed
over classes and averaged over the batch (vat_tf ``kl_divergence_with_logit``); the masked cross-entropy is
averaged over ALL unlabelled samples, the masked-out ones counting in the denominator (fixmatch
``reduce_mean(loss * mask)``). Targets are passed as the caller wants them: detach a teacher's output
before passing it (the Pi-model of tempens does not).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_mse(logits: Tensor, target_probs: Tensor) -> Tensor:
    """``mean_{b, c} (softmax(logits)_bc - q_bc)^2`` for target probabilities ``q`` (B, C)."""
    return (torch.softmax(logits, dim=1) - target_probs).pow(2).mean()


def kl_consistency(logits: Tensor, target_logits: Tensor) -> Tensor:
    """``mean_b sum_c q_bc (log q_bc - log p_bc)`` = KL(q || p), ``q = softmax(target_logits)``, ``p =
    softmax(logits)``; both from logits for numerical stability (VAT: target = the clean logits, detached)."""
    log_q = F.log_softmax(target_logits, dim=1)
    return (log_q.exp() * (log_q - F.log_softmax(logits, dim=1))).sum(dim=1).mean()


def entropy(logits: Tensor) -> Tensor:
    """``H = -mean_b sum_c p_bc log p_bc`` with ``p = softmax(logits)`` (entropy minimisation's penalty)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean_b m_b CE(logits_b, y_b)`` over ALL B samples; ``targets`` are class indices (B,) or
    probabilities (B, C); ``mask`` (B,) float (None: all ones)."""
    if targets.ndim == logits.ndim:  # soft targets
        loss = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    else:
        loss = F.cross_entropy(logits, targets, reduction="none")
    if mask is not None:
        loss = loss * mask
    return loss.mean()
