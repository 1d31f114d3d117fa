"""Entropy minimisation (Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization", NIPS 2004), as
the VAT code's ``vat+ent`` and USB's ``entmin`` use it on deep networks."""
from __future__ import annotations

from torch import Tensor

from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiBatch, SemiSupervisedMethod
from ssl_lightning.semi import entropy


@METHODS.register("entropy_minimisation")
class EntropyMinimisation(SemiSupervisedMethod):
    """``L_u = H(p(y|u)) = -mean_b sum_c p_bc log p_bc`` on the first unlabelled view (``data.unlabelled_views:
    [weak]``), with gradient through p: confident predictions on unlabelled images.

    Args:
        lambda_u: the weight (1 in the VAT code's ``vat+ent``; USB uses 0.06).
        **kwargs: :class:`SemiSupervisedMethod` options.
    """

    def unlabelled_loss(self, batch: SemiBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return entropy(batch.view_logits[0]), {}
