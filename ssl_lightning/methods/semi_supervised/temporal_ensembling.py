"""Temporal ensembling (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017;
smlaine2/tempens ``train.py``)."""
from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.methods.instance.per_sample import PerSampleState
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiBatch
from ssl_lightning.methods.semi_supervised.pi_model import PiModel
from ssl_lightning.semi import TemporalEnsemble, softmax_mse


@METHODS.register("temporal_ensembling")
class TemporalEnsembling(PerSampleState, PiModel):
    """One pass per unlabelled image (``data.unlabelled_views: [weak]``); its target is the ensemble of its own
    past TRAINING-pass predictions: after every epoch ``Z <- a Z + (1 - a) z`` (a = 0.6, z = softmax of this
    epoch's pass), target ``Z / (1 - a^t)`` with t the epochs done (0 before the first update);
    ``L_u = mean_{b, c} (softmax(f(u))_bc - target_bc)^2``. The weight, noise and learning-rate ramps are the
    Pi-model's, with ``w_max`` 30 (tempens's CIFAR-10 / SVHN value, not 100). ``Z`` is one row per image of the
    unlabelled stream (:class:`~ssl_lightning.semi.TemporalEnsemble`, buffers in the checkpoint).

    Args:
        ensemble_momentum: a (0.6).
        num_samples: rows of Z (default: the data module's unlabelled images, read in setup).
        **kwargs: :class:`PiModel` options (``w_max``, ``rampup_epochs``, ``input_noise``...).
    """

    state_name = "ensemble"

    def __init__(self, ensemble_momentum: float = 0.6, num_samples: int | None = None, w_max: float = 30.0,
                 **kwargs) -> None:
        super().__init__(w_max=w_max, **kwargs)
        self.ensemble: TemporalEnsemble | None = None
        if num_samples is not None and self.classifier is not None:
            self.build_state(num_samples)

    def _build_state(self, n: int) -> None:  # in setup, after the base built the classifier
        self.ensemble = TemporalEnsemble(n, self.classifier.out_features, self.hparams.ensemble_momentum).to(self.device)

    def unlabelled_loss(self, batch: SemiBatch) -> tuple[Tensor, dict[str, Tensor]]:
        self.require_state()
        logits = batch.view_logits[0]
        self.ensemble.record(batch.index, torch.softmax(logits.detach(), dim=1))
        return softmax_mse(logits, self.ensemble.targets(batch.index.to(self.ensemble.ensemble.device))), {}

    def on_train_epoch_end(self) -> None:
        if self.ensemble is not None:
            self.ensemble.end_epoch()
