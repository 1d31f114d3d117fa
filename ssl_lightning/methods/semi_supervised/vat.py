"""Virtual adversarial training (Miyato et al., "Virtual Adversarial Training: A Regularization Method for
Supervised and Semi-Supervised Learning", TPAMI 2018; takerum/vat_tf ``train_semisup.py``, ``vat.py``).

``L = CE(f(x_l), y_l) + lambda_u KL(p(y|u) || p(y|u + r_adv)) [+ entropy_weight H(p(y|u))]`` with ``r_adv`` the
direction of one power iteration (:func:`~ssl_lightning.losses.semi_supervised.vat_loss`). Only the labelled pass
updates BatchNorm's running statistics; the clean unlabelled pass and the perturbed passes normalise with their
own batch statistics but leave the running ones as they were (:func:`~ssl_lightning.semi.frozen_bn_stats`).
"""
from __future__ import annotations

from torch import Tensor

from ssl_lightning.losses.semi_supervised import vat_loss
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiBatch, SemiSupervisedMethod
from ssl_lightning.registry import SSLError
from ssl_lightning.semi import entropy, frozen_bn_stats


@METHODS.register("vat")
class VAT(SemiSupervisedMethod):
    """Args:
        eps: the adversarial perturbation's L2 norm per image (CIFAR-10 8 with augmentation, 10 without;
            SVHN 3.5 / 2.5; for inputs normalised per channel as here).
        xi: the finite-difference step of the power iteration (1e-6 in vat_tf).
        power_iterations: 1 in the paper.
        entropy_weight: weight of the entropy term on the unlabelled predictions: 1 = "VAT+EntMin", 0 = VAT.
        **kwargs: :class:`SemiSupervisedMethod` options (vat_tf: Adam lr 1e-3, lambda_u 1).
    """

    def __init__(self, eps: float = 8.0, xi: float = 1e-6, power_iterations: int = 1, entropy_weight: float = 1.0,
                 optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> None:
        if eps <= 0 or xi <= 0 or power_iterations < 1 or entropy_weight < 0:
            raise SSLError(f"VAT: eps={eps}, xi={xi}, power_iterations={power_iterations}, entropy_weight="
                           f"{entropy_weight}: use eps > 0, xi > 0, power_iterations >= 1 and entropy_weight >= 0.")
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)

    def forward_batch(self, batch: SemiBatch) -> tuple[Tensor, list[Tensor]]:
        logits = self.logits(batch.x)  # the labelled pass: the only one that moves the BN statistics
        with frozen_bn_stats(self):
            return logits, [self.logits(v) for v in batch.views]

    def unlabelled_loss(self, batch: SemiBatch) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        if len(batch.views) != 1:
            raise SSLError(f"VAT uses one view of each unlabelled image, got {len(batch.views)}: set "
                           "data.unlabelled_views: [weak] and data.k_unlabelled: 1.")
        u, clean = batch.views[0], batch.view_logits[0]
        with frozen_bn_stats(self):
            vat = vat_loss(self.logits, u, clean, hp.eps, hp.xi, hp.power_iterations)
        ent = entropy(clean)
        return vat + hp.entropy_weight * ent, {"vat_loss": vat, "entropy": ent}
