"""Confidence masks and hard pseudo-labels (FixMatch, Pseudo-label).

FixMatch (fixmatch ``fixmatch.py``): ``q = stop_grad(softmax(weak logits))``, label ``argmax q``, mask
``max q >= tau`` (0.95). The FixMatch repository's Pseudo-label baseline (``pseudo_label.py``) takes the
argmax of the same forward pass and the strict ``max p > tau``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def confidence_mask(probs: Tensor, threshold: float, strict: bool = False) -> Tensor:
    """``1.0`` where ``max_c p_c >= threshold`` (``>`` if ``strict``), else ``0.0``: a float mask (B,), no gradient."""
    top = probs.detach().max(dim=1).values
    return (top > threshold if strict else top >= threshold).to(probs.dtype)


def hard_pseudo_labels(probs: Tensor) -> Tensor:
    """``argmax_c p_c`` (B,), long."""
    return probs.detach().argmax(dim=1)


def pseudo_label(logits: Tensor, threshold: float, strict: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """FixMatch's targets from the weak view's logits: ``(labels, mask, probs)`` of the detached softmax
    (computed in float32 at least, also under mixed precision)."""
    logits = logits.detach()
    probs = torch.softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
    return hard_pseudo_labels(probs), confidence_mask(probs, threshold, strict), probs
