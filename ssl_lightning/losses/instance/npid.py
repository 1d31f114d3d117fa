"""Instance discrimination with a non-parametric softmax (NPID; Wu et al., "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", CVPR 2018; lemniscate.pytorch ``lib/NCEAverage.py``,
``lib/NCECriterion.py``, ``lib/LinearAverage.py``): each image is its own class, its weight vector the memory-bank
row of its previous embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.registry import SSLError

NCE_EPS = 1e-7  # the official NCECriterion's eps


def npid_nce_loss(probs: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss of the non-parametric softmax, as the official ``NCECriterion``.

    ``probs`` (B, K + 1): ``P(i|v) = exp(m_i.v / T) / Z`` for each image's own bank row (column 0) and its K noise
    rows (noise distribution uniform, ``P_n = 1/n``). With ``h = P / (P + K/n + eps)``:
    ``loss = -(sum_b log h_pos + sum_{b,k} log(K/n / (P_noise + K/n + eps))) / B`` -- the noise term is
    ``log(1 - h)`` with the official code's eps only in the denominator.
    """
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise SSLError(f"npid_nce_loss needs (B, K + 1) probabilities with K >= 1 noise samples, got {tuple(probs.shape)}")
    k_pn = (probs.shape[1] - 1) / num_samples  # K * P_n
    log_h_pos = torch.log(probs[:, 0] / (probs[:, 0] + k_pn + NCE_EPS))
    log_not_h_noise = torch.log(k_pn / (probs[:, 1:] + k_pn + NCE_EPS))
    return -(log_h_pos.sum() + log_not_h_noise.sum()) / probs.shape[0]


def npid_nce_probs(embeddings: torch.Tensor, rows: torch.Tensor, temperature: float,
                   z: torch.Tensor | float) -> torch.Tensor:
    """``P = exp(m.v / T) / Z`` (B, K + 1) from embeddings v (B, d) and bank rows m (B, K + 1, d) (no gradient to m)."""
    return torch.einsum("bkd,bd->bk", rows.detach(), embeddings).div(temperature).exp().div(z)


def npid_softmax_loss(embeddings: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Exact non-parametric softmax (the official CIFAR recipe, ``LinearAverage``, K = 0): cross-entropy over all n
    bank rows with logits ``m_j.v / T``, the image's own row ``index`` being the class (no gradient to the bank)."""
    return F.cross_entropy(embeddings @ bank.detach().T / temperature, index)
