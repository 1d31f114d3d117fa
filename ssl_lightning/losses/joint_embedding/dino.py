"""DINO's self-distillation loss (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021). Follows facebookresearch/dino main_dino.py ``DINOLoss``."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_lightning import distributed


def dino_cross_entropy(teacher_probs: Sequence[torch.Tensor], student_out: Sequence[torch.Tensor],
                       student_temp: float = 0.1) -> torch.Tensor:
    """``mean over pairs (t, s), s != t, of mean_b H(P_t, P_s)``, ``H(a, b) = -sum_k a_k log b_k``.

    ``teacher_probs[t]`` (B x K) are the teacher's (centred, sharpened) probabilities of global crop t;
    ``student_out[s]`` (B x K) the student's raw outputs of crop s, crops in the same order (the first
    ``len(teacher_probs)`` student crops are the teacher's global crops, so ``s == t`` is skipped).
    """
    log_p = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    terms = [-(q * log_p[s]).sum(dim=-1).mean()
             for t, q in enumerate(teacher_probs) for s in range(len(student_out)) if s != t]
    return torch.stack(terms).mean()


class DINOLoss(nn.Module):
    """The cross-entropy above with the teacher's centring, holding the centre ``c`` as a buffer
    (saved in checkpoints).

    ``P_t = softmax((g_t - c) / T_t)`` (no gradient), ``P_s = softmax(g_s / T_s)``; after the loss,
    ``c <- m c + (1 - m) mean(g_t)`` with the mean over the teacher's global crops of the GLOBAL batch
    (sum all-reduced over processes, divided by the global count, as the official ``update_center``).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        probs = [F.softmax((t.detach() - self.center) / teacher_temp, dim=-1) for t in teacher_out]
        loss = dino_cross_entropy(probs, student_out, self.student_temp)
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        g = torch.cat([t.detach() for t in teacher_out])
        batch_sum, count = g.sum(dim=0, keepdim=True), g.shape[0]
        if distributed.world_size() > 1:
            dist.all_reduce(batch_sum)
            count *= distributed.world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


def teacher_temperature(epoch: int, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                        warmup_teacher_temp_epochs: int = 30) -> float:
    """The official schedule: ``linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)[epoch]`` during
    the warm-up (so the last warm-up epoch already has ``teacher_temp``), then ``teacher_temp``."""
    if epoch < warmup_teacher_temp_epochs:
        step = (teacher_temp - warmup_teacher_temp) / max(1, warmup_teacher_temp_epochs - 1)
        return warmup_teacher_temp + step * epoch  # plain Python: no tensor to read back in the training step
    return teacher_temp
