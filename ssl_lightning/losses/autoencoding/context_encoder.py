"""The context encoder's losses (Pathak et al., "Context Encoders: Feature Learning by Inpainting", CVPR 2016;
pathak22/context-encoder ``train.lua`` and ``train_random.lua``).

Joint loss ``(1 - lambda_adv) L_rec + lambda_adv L_adv`` (``wtl2 = 0.999``: lambda_adv = 0.001). ``L_rec`` is the
mean over the predicted region of ``w * (pred - true)^2``: central region: the predicted square overlaps the
context by ``overlap`` px, and that border counts ``overlap_weight`` (10) times; random region: the whole image is
predicted and the unmasked pixels count 10 times (``train_random.lua``). ``L_adv = BCE(D(pred), real)``, and the
discriminator minimises ``BCE(D(true), real) + BCE(D(pred), fake)`` (errD_real + errD_fake).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.registry import SSLError


def overlap_weights(hole: int, overlap: int, overlap_weight: float = 10.0, device=None) -> torch.Tensor:
    """(hole, hole): ``overlap_weight`` on the border of width ``overlap`` (the context the prediction overlaps),
    1 inside (the missing pixels)."""
    if not 0 <= 2 * overlap < hole:
        raise SSLError(f"overlap={overlap} must leave a hole: 0 <= 2 * overlap < hole={hole}")
    w = torch.full((hole, hole), float(overlap_weight), device=device)
    w[overlap:hole - overlap, overlap:hole - overlap] = 1.0
    return w


def region_weights(mask: torch.Tensor, overlap_weight: float = 10.0) -> torch.Tensor:
    """Random region: 1 on the masked (missing) pixels, ``overlap_weight`` on the rest of the image."""
    return torch.where(mask, 1.0, float(overlap_weight)).to(torch.get_default_dtype())


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``BCE(D(true), 1) + BCE(D(pred), 0)``, each a batch mean."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``BCE(D(pred), 1)``: the generator wants its predictions taken for real ones."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def context_encoder_loss(rec: torch.Tensor, adv: torch.Tensor | None, lambda_adv: float) -> torch.Tensor:
    """``(1 - lambda_adv) rec + lambda_adv adv``; ``rec`` alone when there is no adversarial term."""
    if adv is None or lambda_adv == 0:
        return rec
    return (1 - lambda_adv) * rec + lambda_adv * adv
