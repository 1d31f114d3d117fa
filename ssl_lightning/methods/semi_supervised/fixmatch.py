"""FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence",
NeurIPS 2020; google-research/fixmatch ``fixmatch.py``).

``L = CE(f(x_l), y_l) + lambda_u mean_b 1[max q_b >= tau] CE(f(A(u_b)), argmax q_b)``, ``q = stop_grad(softmax(
f(alpha(u))))`` for a weak view ``alpha`` and a strong view ``A``; one forward over labelled + weak + strong (the
base's ``forward_batch``: BatchNorm sees them all); SGD Nesterov, lr ``cos(7 pi k / 16 K)``, EMA 0.999 evaluated.
"""
from __future__ import annotations

from torch import Tensor

from ssl_lightning.losses.semi_supervised import fixmatch_loss
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiBatch, SemiSupervisedMethod
from ssl_lightning.registry import SSLError


@METHODS.register("fixmatch")
class FixMatch(SemiSupervisedMethod):
    """Args:
        threshold: the confidence ``tau`` a pseudo-label needs (0.95).
        **kwargs: :class:`SemiSupervisedMethod` options; the defaults are the paper's (lambda_u 1, SGD Nesterov
            momentum 0.9, lr 0.03, weight decay 5e-4 on kernels, the FixMatch cosine, EMA 0.999).
    """

    def __init__(self, threshold: float = 0.95, lambda_u: float = 1.0, optimizer: str = "sgd", lr: float = 0.03,
                 momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4,
                 lr_schedule: str = "fixmatch", ema_decay: float | None = 0.999, **kwargs) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise SSLError(f"FixMatch: threshold={threshold}: use a confidence in [0, 1] (the paper's 0.95).")
        super().__init__(lambda_u=lambda_u, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, lr_schedule=lr_schedule, ema_decay=ema_decay, **kwargs)

    def unlabelled_loss(self, batch: SemiBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if len(batch.view_logits) != 2:
            raise SSLError(f"FixMatch needs a weak and a strong view of each unlabelled image, got "
                           f"{len(batch.view_logits)} views: set data.unlabelled_views: [weak, strong] and "
                           "data.k_unlabelled: 1.")
        weak, strong = batch.view_logits
        loss, mask, _ = fixmatch_loss(weak, strong, self.hparams.threshold)
        return loss, {"mask_rate": mask.mean()}
