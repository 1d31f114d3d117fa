"""Pseudo-label (Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep Neural
Networks", ICML workshop 2013) in its modern form: the FixMatch repository's ``pseudo_label.py`` baseline."""
from __future__ import annotations

from torch import Tensor

from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiBatch, SemiSupervisedMethod
from ssl_lightning.registry import SSLError
from ssl_lightning.semi import masked_cross_entropy, pseudo_label


@METHODS.register("pseudo_label")
class PseudoLabel(SemiSupervisedMethod):
    """Hard targets from the same forward pass: ``y_hat = argmax p(y|u)`` (no gradient), kept where ``max p >
    threshold``; ``L_u = (1 / mu B) sum_b 1[max p_b > tau] CE(f(u_b), y_hat_b)``, averaged over ALL unlabelled
    images (the masked ones count in the denominator). The weight ramps linearly over the first 40% of training.

    Args:
        threshold: the confidence tau (0.95); strict ``>`` as the FixMatch repository's baseline.
        lambda_u, rampup, rampup_length, rampup_unit: the weight, by default 1 after a linear ramp over 40% of the
            steps (Lee's own schedule, alpha_f 3 between epochs 100 and 600, is not the default).
        **kwargs: :class:`SemiSupervisedMethod` options.
    """

    def __init__(self, threshold: float = 0.95, rampup: str = "linear", rampup_length: float = 0.4,
                 rampup_unit: str = "fraction", **kwargs) -> None:
        super().__init__(rampup=rampup, rampup_length=rampup_length, rampup_unit=rampup_unit, **kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise SSLError(f"PseudoLabel: threshold={threshold}: use a confidence in [0, 1] (0.95).")
        self.threshold = threshold

    def unlabelled_loss(self, batch: SemiBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = batch.view_logits[0]
        labels, mask, _ = pseudo_label(logits, self.threshold, strict=True)
        return masked_cross_entropy(logits, labels, mask), {"mask_rate": mask.mean()}
