"""FixMatch (Sohn et al., NeurIPS 2020; google-research/fixmatch ``fixmatch.py``).

Pseudo-label ``y^ = argmax q`` of the weak view's detached prediction ``q``, kept where ``max q >= tau``
(0.95); the unlabelled loss is the cross-entropy of the strong view's logits against ``y^``, averaged over
ALL ``mu B`` unlabelled samples (the masked-out ones count in the denominator).
"""
from __future__ import annotations

from torch import Tensor

from ssl_lightning.semi.consistency import masked_cross_entropy
from ssl_lightning.semi.masks import pseudo_label


def fixmatch_loss(logits_weak: Tensor, logits_strong: Tensor, threshold: float = 0.95
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, mask, pseudo_labels)``: ``mean_b 1[max q_b >= tau] CE(logits_strong_b, argmax q_b)``."""
    labels, mask, _ = pseudo_label(logits_weak, threshold)
    return masked_cross_entropy(logits_strong, labels, mask.to(logits_strong.dtype)), mask, labels
