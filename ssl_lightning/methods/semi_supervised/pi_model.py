"""Pi-model (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017; smlaine2/tempens
``train.py``)."""
from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiBatch, SemiSupervisedMethod
from ssl_lightning.registry import SSLError
from ssl_lightning.semi import pi_model_weight, softmax_mse


@METHODS.register("pi_model")
class PiModel(SemiSupervisedMethod):
    """Two stochastic passes ``z, z~`` of every unlabelled image (two augmentations, ``data.unlabelled_views:
    [weak, weak]``, plus Gaussian noise on every input, labelled ones too, as tempens's input layer): ``L_u = mean_{b, c} (softmax(z)_bc - softmax(z~)_bc)^2``, the
    mean over the batch AND the classes. Stop-gradient: none by default -- the official code backpropagates
    through both branches (``detach_target: true`` detaches the second, as the FixMatch-repo and USB baselines).

    The weight is tempens's ``w(t) = w_max exp(-5 (1 - t)^2)`` with ``t = epoch / rampup_epochs``, 0 in the first
    epoch, ``w_max`` scaled by labelled / training images (``scale_w_max``); with ``lr_schedule: tempens`` and
    ``warmup_epochs: 80`` the same ramp scales the learning rate (Adam 0.003, BS 100, 300 epochs in the paper).
    ``tempens_weight: false`` uses the base's ``lambda_u`` and ramp instead (the FixMatch repository's baseline:
    weight 10, linear over 40% of training, ``detach_target: true``, ``input_noise: 0``).
    With ``data.unlabelled: all`` the labelled images are in the unlabelled stream too, as in tempens where every
    training image gets the consistency term.

    Args:
        w_max: the weight after the ramp-up (100 on CIFAR-10 / SVHN).
        rampup_epochs: length of the ramp-up in epochs (80).
        scale_w_max: multiply w_max by ``num_labelled / num_training_images`` (tempens).
        input_noise: std of the Gaussian noise added to every input image (0.15 in tempens, on ZCA inputs).
        detach_target: stop the gradient through the second pass.
        tempens_weight: the tempens weight above (False: ``lambda_u`` x the base's ramp).
        **kwargs: :class:`SemiSupervisedMethod` options.
    """

    def __init__(self, w_max: float = 100.0, rampup_epochs: float = 80, scale_w_max: bool = True,
                 input_noise: float = 0.15, detach_target: bool = False, tempens_weight: bool = True,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if w_max < 0 or rampup_epochs < 0 or input_noise < 0:
            raise SSLError(f"{type(self).__name__}: w_max={w_max}, rampup_epochs={rampup_epochs}, input_noise="
                           f"{input_noise}: use values >= 0.")

    def unlabelled_weight(self) -> float:
        hp, dm = self.hparams, self.trainer.datamodule
        if not hp.tempens_weight:
            return super().unlabelled_weight()
        if hp.scale_w_max:
            num_training = dm.num_unlabelled + (dm.num_labelled if dm.unlabelled == "rest" else 0)
            return pi_model_weight(self.current_epoch, hp.w_max, hp.rampup_epochs, dm.num_labelled, num_training)
        return pi_model_weight(self.current_epoch, hp.w_max, hp.rampup_epochs)

    def forward_batch(self, batch: SemiBatch) -> tuple[Tensor, list[Tensor]]:
        sigma = self.hparams.input_noise
        if sigma > 0:
            batch.x = batch.x + sigma * torch.randn_like(batch.x)
            batch.views = [v + sigma * torch.randn_like(v) for v in batch.views]
        return super().forward_batch(batch)

    def unlabelled_loss(self, batch: SemiBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if len(batch.view_logits) < 2:
            raise SSLError("PiModel needs two views of every unlabelled image: set data.unlabelled_views: [weak, weak] "
                           "(or data.k_unlabelled: 2).")
        z, z_tilde = batch.view_logits[:2]
        target = torch.softmax(z_tilde, dim=1)
        return softmax_mse(z, target.detach() if self.hparams.detach_target else target), {}
