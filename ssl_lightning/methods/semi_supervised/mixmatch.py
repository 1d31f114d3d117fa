"""MixMatch (Berthelot et al., "MixMatch: A Holistic Approach to Semi-Supervised Learning", NeurIPS 2019;
google-research/mixmatch ``mixmatch.py``, ``libml/layers.py``).

Guess ``q = sharpen(mean_k softmax(f(u_k)), T)`` (stop-gradient) for K augmentations of each unlabelled image;
MixUp ``concat(X, U)`` with a shuffle of itself, ``lambda' = max(lambda, 1 - lambda)`` per example; then
``L = CE(f(X'), y') + lambda_u(t) mean_{b, c} (q' - f(U'))^2`` with lambda_u ramped linearly (16k steps).
The mixed batches are interleaved so that the ONE forward whose BatchNorm statistics are kept (the first)
holds labelled and unlabelled samples alike; the label-guess passes and the other batches leave them as they
were (:func:`~ssl_lightning.semi.frozen_bn_stats`), as the official code's update ops do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.losses.semi_supervised import guess_labels, mixmatch_loss
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiBatch, SemiSupervisedMethod
from ssl_lightning.registry import SSLError
from ssl_lightning.semi import deinterleave, frozen_bn_stats, interleave, mixup


@METHODS.register("mixmatch")
class MixMatch(SemiSupervisedMethod):
    """Args:
        temperature: the sharpening temperature T (0.5).
        alpha: MixUp's Beta(alpha, alpha) (published CIFAR-10 0.75; code default 0.5).
        per_example_lambda: one lambda per example (the official code); False = one per batch (USB).
        **kwargs: :class:`SemiSupervisedMethod` options; defaults as the paper: lambda_u 75 ramped linearly over
            16,000 steps, Adam lr 0.002 with decoupled weight decay 0.02 x lr on kernels (AdamW 0.02), EMA 0.999.
    The data give K weak views of ``mu B`` unlabelled images (``data.unlabelled_views: [weak]``,
    ``data.k_unlabelled: 2``, ``data.mu: 1``); the ``(1 + K mu) B`` mixed samples are forwarded in batches of B.
    """

    def __init__(self, temperature: float = 0.5, alpha: float = 0.75, per_example_lambda: bool = True,
                 lambda_u: float = 75.0, rampup: str = "linear", rampup_length: float = 16000,
                 rampup_unit: str = "steps", optimizer: str = "adamw", lr: float = 0.002, weight_decay: float = 0.02,
                 lr_schedule: str = "constant", ema_decay: float | None = 0.999, **kwargs) -> None:
        if temperature <= 0 or alpha < 0:
            raise SSLError(f"MixMatch: temperature={temperature}, alpha={alpha}: use T > 0 (0.5) and alpha >= 0 (0.75).")
        super().__init__(lambda_u=lambda_u, rampup=rampup, rampup_length=rampup_length, rampup_unit=rampup_unit,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         ema_decay=ema_decay, **kwargs)

    def mixed_logits(self, batches: list[Tensor]) -> Tensor:
        """Logits of the (1 + K mu) mixed batches of B rows, interleaved so that the first forward -- the only
        one that moves BatchNorm's statistics -- holds a slice of every batch; returned in the original order."""
        batches = interleave(batches)
        logits = [self.logits(batches[0])]
        with frozen_bn_stats(self):
            logits += [self.logits(b) for b in batches[1:]]
        return torch.cat(deinterleave(logits))

    def objective(self, batch: SemiBatch) -> dict[str, Tensor]:
        hp = self.hparams
        x, views = batch.x, batch.views
        if not views:
            raise SSLError("MixMatch needs K views of each unlabelled image: set data.mu >= 1, data.unlabelled_views: "
                           "[weak] and data.k_unlabelled: 2.")
        b, n = x.shape[0], x.shape[0] + sum(v.shape[0] for v in views)
        if n % b:
            raise SSLError(f"MixMatch forwards its mixed samples in batches of the labelled batch ({b}); the "
                           f"unlabelled views hold {n - b} images: use an integer data.mu.")
        with torch.no_grad(), frozen_bn_stats(self):
            guess = guess_labels([self.logits(v) for v in views], hp.temperature)
        targets = torch.cat([F.one_hot(batch.y, guess.shape[1]).to(guess)] + [guess] * len(views))
        mixed = mixup(torch.cat([x, *views]), targets, hp.alpha, per_example=hp.per_example_lambda)
        logits = self.mixed_logits(list(mixed.inputs.split(b)))
        supervised, unlabelled = mixmatch_loss(logits[:b], mixed.targets[:b], logits[b:], mixed.targets[b:])
        weight = self.unlabelled_weight()
        self.log("train/unlabelled_weight", weight, batch_size=b)
        return {"loss": supervised + weight * unlabelled, "supervised_loss": supervised, "unlabelled_loss": unlabelled}
