"""``SemiSupervisedMethod``: what every semi-supervised method shares, so a method file holds only its
unlabelled loss.

A method subclasses :class:`SemiSupervisedMethod` and implements :meth:`~SemiSupervisedMethod.unlabelled_loss`.
The training objective of a step is

    L = CE(f(x_l), y_l) + w(t) * L_u

with the cross-entropy averaged over the full labelled batch, ``L_u`` the method's unlabelled loss and ``w(t) =
lambda_u * ramp(t)`` (:mod:`ssl_lightning.semi.ramps`). The data are
:class:`~ssl_lightning.data.SemiSupervisedDataModule`'s batches; the network is a registered backbone followed by
a linear classifier. Optimizer (SGD with optional Nesterov momentum, AdamW; no weight decay on biases and norm
parameters, i.e. on conv / linear kernels only), per-step schedule, EMA teachers, logging and the NaN guard are
:class:`~ssl_lightning.methods.base.SSLMethod`'s. An optional EMA of the network's weights (``ema_decay``,
FixMatch / MixMatch 0.999) is the model that validation and test score.

Evaluation: ``val/acc`` on the validation split carved from the training labels (select on it), ``test/acc`` on
the test split (report the FINAL value, never select on it). The kNN and cluster monitors step aside: the
validation step returns no features.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.modules.ema import momentum_copy
from ssl_lightning.registry import SSLError
from ssl_lightning.optim import warmup_cosine
from ssl_lightning.semi.ramps import (ema_warmup_decay, fixmatch_lr_factor, linear_rampup, mean_teacher_momentum,
                                      sigmoid_rampup, tempens_rampdown)

Ramp = Literal["none", "linear", "sigmoid"]
RampUnit = Literal["fraction", "epochs", "steps"]
LRSchedule = Literal["cosine", "fixmatch", "constant", "tempens"]
RAMPS = {"none": lambda t, length: 1.0, "linear": linear_rampup, "sigmoid": sigmoid_rampup}


@dataclass
class SemiBatch:
    """One training step's data, and the logits that :meth:`SemiSupervisedMethod.forward_batch` computed.

    ``views`` / ``view_logits``: one entry per unlabelled view (``data.unlabelled_views`` x ``data.k_unlabelled``,
    e.g. FixMatch's ``[weak, strong]``), each ``(mu B, ...)``; empty with ``data.mu = 0``. ``index``: the unlabelled
    images' rows in the data module's ``unlabelled_set`` (per-sample state), None with ``mu = 0``."""

    x: Tensor  # labelled images (B, C, H, W), one weak view
    y: Tensor  # their labels (B,)
    labelled_index: Tensor  # their rows in the data module's labelled_set
    views: list[Tensor] = field(default_factory=list)
    index: Tensor | None = None
    logits: Tensor | None = None  # (B, num_classes) of x, set by forward_batch
    view_logits: list[Tensor] = field(default_factory=list)  # (mu B, num_classes) of each view


class SemiSupervisedMethod(SSLMethod):
    """Base LightningModule of the semi-supervised methods (see the module docstring).

    Args:
        num_classes: classifier outputs (the CLI links it from the data; None = read from the data module).
        lambda_u: the unlabelled loss's weight after the ramp-up.
        rampup: shape of the weight's ramp-up (``linear``: t; ``sigmoid``: exp(-5 (1 - t)^2)); ``none`` = constant.
        rampup_length: its length in ``rampup_unit``: a ``fraction`` of all training steps (Pseudo-label 0.4),
            ``epochs`` (Mean Teacher 5) or optimizer ``steps`` (MixMatch 16,000).
        ema_decay: keep an EMA of the backbone and classifier with this decay (updated after every step) and
            evaluate it instead of the trained weights; None = no EMA model.
        ema_warmup: the decay after step k is ``min(1 - 1 / (k + 1), ema_decay)`` (Mean Teacher's warm-up: the EMA
            starts as a plain average of the first students) instead of the fixed ``ema_decay`` of FixMatch and
            MixMatch, whose EMA still holds ``ema_decay^k`` of the initial weights after k steps (0.67 after 400
            steps at 0.999): use it for short runs. ``"tf"``: ``min((1 + k) / (10 + k), ema_decay)``, TensorFlow's
            ``ExponentialMovingAverage(num_updates=k)`` (:func:`~ssl_lightning.semi.ramps.ema_warmup_decay`): it
            averages over the last ~k/10 steps rather than all k, so that a short run's EMA does not keep its
            earliest weights either (a 400-step Fashion-MNIST run: supervised 67.5% test accuracy vs 36.6% with
            the plain average); equal to ``ema_decay`` 0.999 from k ~ 9,000 on.
        lr: the optimizer's learning rate as the papers give it (NOT per 256 images: semi-supervised recipes state
            it for their batch; with more processes, scale it yourself if you want to).
        lr_schedule: per-step factor: ``cosine`` (warm-up, then cosine to ``min_lr_ratio``), ``fixmatch``
            (cos(7 pi k / 16 K), ends at ~0.2), ``constant`` (after the warm-up), ``tempens`` (Laine & Aila: the
            sigmoid ramp-up over ``warmup_epochs`` and the ramp-down over the last ``rampdown_epochs``).
        rampdown_epochs: the ``tempens`` schedule's ramp-down length (50 in tempens; 0 = none).
        nesterov: Nesterov momentum (SGD; FixMatch, Mean Teacher).
        init_backbone: start the backbone from this framework's self-supervised run: a Lightning ``.ckpt`` or a
            weight file written by ``ssl-lightning export`` (loaded when training starts, not on resume). Its
            backbone must be this method's (name, options, input channels).
        **kwargs: :class:`~ssl_lightning.methods.base.SSLMethod` options (backbone, optimizer, weight_decay, ...).
    """

    online_probe = False  # the classifier is trained with the labels; no probe beside it
    #: whether the method uses the unlabelled views (False: the supervised baseline ignores them)
    needs_unlabelled: bool = True

    def __init__(
        self,
        lambda_u: float = 1.0,
        rampup: Ramp = "none",
        rampup_length: float = 0.0,
        rampup_unit: RampUnit = "fraction",
        ema_decay: float | None = None,
        ema_warmup: bool | Literal["tf"] = False,
        lr_schedule: LRSchedule = "cosine",
        rampdown_epochs: float = 0.0,
        nesterov: bool = False,
        init_backbone: str | None = None,
        lr: float = 0.03,
        warmup_epochs: float = 0.0,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay, **kwargs)
        self._check(lambda_u, rampup, rampup_length, rampup_unit, ema_decay, lr_schedule, nesterov)
        if ema_warmup not in (False, True, "tf"):
            raise SSLError(f"{type(self).__name__}: ema_warmup={ema_warmup!r}: use false, true (Mean Teacher's "
                           "min(1 - 1/(k+1), decay)) or \"tf\" (min((1+k)/(10+k), decay)).")
        self.classifier: nn.Linear | None = None
        self.ema_backbone: nn.Module | None = None
        self.ema_classifier: nn.Module | None = None
        self.val_acc = nn.ModuleDict()  # {"val": accuracy, "test": accuracy}, built with the classifier
        self._init_loaded = False
        if self.hparams.num_classes:
            self._build_classifier(int(self.hparams.num_classes))

    def _check(self, lambda_u, rampup, rampup_length, rampup_unit, ema_decay, lr_schedule, nesterov) -> None:
        name = type(self).__name__
        if lambda_u < 0:
            raise SSLError(f"{name}: lambda_u={lambda_u}: the unlabelled loss weight must be >= 0.")
        if rampup not in RAMPS or rampup_unit not in ("fraction", "epochs", "steps") or rampup_length < 0:
            raise SSLError(f"{name}: rampup={rampup!r}, rampup_length={rampup_length}, rampup_unit={rampup_unit!r}: "
                           f"use rampup in {sorted(RAMPS)}, a length >= 0 and a unit in fraction / epochs / steps.")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise SSLError(f"{name}: ema_decay={ema_decay}: use a decay in [0, 1) (FixMatch 0.999), or null for no "
                           "EMA model.")
        if lr_schedule not in ("cosine", "fixmatch", "constant", "tempens"):
            raise SSLError(f"{name}: lr_schedule={lr_schedule!r}: use cosine, fixmatch, constant or tempens.")
        if nesterov and (self.hparams.optimizer != "sgd" or self.hparams.momentum <= 0):
            raise SSLError(f"{name}: nesterov needs optimizer: sgd with momentum > 0, got optimizer: "
                           f"{self.hparams.optimizer}, momentum: {self.hparams.momentum}: set nesterov: false or use SGD")

    def _build_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.backbone.num_features, num_classes)
        if self.hparams.ema_decay is not None:
            self.ema_backbone, self.ema_classifier = momentum_copy(self.backbone), momentum_copy(self.classifier)
        self.val_acc = nn.ModuleDict({k: MulticlassAccuracy(num_classes, average="micro") for k in ("val", "test")})

    # ---- to implement in methods --------------------------------------------------------------------------------
    def unlabelled_loss(self, batch: SemiBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The method's unlabelled loss ``L_u`` (before the weight ``w(t)``) and extra terms to log
        (``train/<name>``, e.g. the mask rate)."""
        raise NotImplementedError

    def forward_batch(self, batch: SemiBatch) -> tuple[Tensor, list[Tensor]]:
        """Logits of the labelled images and of each unlabelled view. Default: ONE forward pass over
        ``concat(x, *views)``, so that BatchNorm's batch statistics cover labelled and unlabelled images
        (FixMatch); override for other passes (VAT: the BatchNorm statistics of the labelled pass only)."""
        x, views = batch.x, batch.views
        logits = self.logits(torch.cat([x, *views])) if views else self.logits(x)
        first, *rest = logits.split([x.shape[0]] + [v.shape[0] for v in views])
        return first, list(rest)

    def objective(self, batch: SemiBatch) -> dict[str, Tensor]:
        """The step's terms, ``"loss"`` the one optimised: ``supervised_loss + w(t) unlabelled_loss`` after
        :meth:`forward_batch` (with no unlabelled views: the supervised loss alone). Override only when a
        method's objective is not of this form (MixMatch's mixed labelled loss)."""
        batch.logits, batch.view_logits = self.forward_batch(batch)
        supervised = self.supervised_loss(batch)
        terms: dict[str, Tensor] = {"supervised_loss": supervised}
        loss = supervised
        if batch.views:
            weight = self.unlabelled_weight()
            unlabelled, logs = self.unlabelled_loss(batch)
            loss = loss + weight * unlabelled
            terms.update(unlabelled_loss=unlabelled, **logs)
            self.log("train/unlabelled_weight", weight, batch_size=batch.x.shape[0])
        terms["loss"] = loss
        return terms

    def supervised_loss(self, batch: SemiBatch) -> Tensor:
        """``CE(f(x_l), y_l)`` averaged over the full labelled batch."""
        return F.cross_entropy(batch.logits, batch.y)

    def unlabelled_weight(self) -> float:
        """``w(t) = lambda_u * ramp(t)`` at this step, ``t`` in ``rampup_unit``."""
        hp, step = self.hparams, self.trainer.global_step
        if hp.rampup_unit == "epochs":
            step = step / self.steps_per_epoch()
        elif hp.rampup_unit == "fraction":
            step = step / max(1, int(self.trainer.estimated_stepping_batches))
        return hp.lambda_u * RAMPS[hp.rampup](step, hp.rampup_length)

    # ---- the network ----------------------------------------------------------------------------------------------
    def logits(self, x: Tensor, ema: bool = False) -> Tensor:
        """``classifier(backbone(x))``; ``ema``: the EMA model's (the trained one when there is none)."""
        if self.classifier is None:
            raise SSLError(f"{type(self).__name__} has no classifier yet: give num_classes, or fit with a "
                           "SemiSupervisedDataModule, whose class count it reads in setup.")
        if ema and self.ema_backbone is not None:
            return self.ema_classifier(self.ema_backbone(x))
        return self.classifier(self.backbone(x))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if self.ema_backbone is None:
            return []
        return [(self.backbone, self.ema_backbone), (self.classifier, self.ema_classifier)]

    def teacher_momentum(self) -> float:
        """The EMA model's decay for the update after optimizer step ``global_step - 1``: ``ema_decay``, or with
        ``ema_warmup`` ``min(1 - 1 / (global_step + 1), ema_decay)``, with ``ema_warmup="tf"``
        ``min((1 + global_step) / (10 + global_step), ema_decay)``."""
        decay = float(self.hparams.ema_decay)
        if self.hparams.ema_warmup == "tf":
            return ema_warmup_decay(self.trainer.global_step, decay)
        return mean_teacher_momentum(self.trainer.global_step, decay) if self.hparams.ema_warmup else decay

    # ---- steps ------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y, labelled_index = batch["labelled"]
        views, index = batch.get("unlabelled") or ([], None)
        views = list(views) if self.needs_unlabelled else []
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        step = SemiBatch(x, y, labelled_index, views, index)
        terms = self.objective(step)
        if step.logits is not None:  # the labelled batch's training accuracy
            terms["acc"] = (step.logits.detach().argmax(1) == y).float().mean()
        self.log_terms(terms, x.shape[0])
        self.nonfinite.observe(self, terms)
        return terms["loss"]

    def _eval_step(self, batch, name: str) -> None:
        images, labels = batch
        metric = self.val_acc[name]
        metric.update(self.logits(images, ema=True), labels)
        self.log(f"{name}/acc", metric, prog_bar=name == "val", add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """``val/acc`` (validation split) and ``test/acc`` (test split) of the EMA model, if any. Returns no
        features, so the kNN / cluster monitors of self-supervised runs step aside."""
        self._eval_step(batch, self._eval_names()[dataloader_idx])

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def _eval_names(self) -> list[str]:
        names = getattr(self.trainer.datamodule, "eval_names", None)
        if names is None:
            raise SSLError(f"{type(self).__name__} validates on a SemiSupervisedDataModule's loaders (val, test); "
                           "fit it with one (data: class ssl_lightning.data.SemiSupervisedDataModule).")
        return names

    def steps_per_epoch(self) -> int:
        return max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)

    # ---- set-up ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and not hasattr(dm, "eval_names"):
            raise SSLError(f"{type(self).__name__} needs a SemiSupervisedDataModule (labelled + unlabelled batches), "
                           f"got {type(dm).__name__}: set data.num_labels or data.labels_per_class and use a "
                           "semi-supervised config (experiments/*/semi/*.yaml).")
        if self.classifier is None:
            n = int(getattr(dm, "num_classes", 0) or 0)
            if n <= 0:
                raise SSLError(f"{type(self).__name__}: no class count: give model.num_classes or a data module with classes.")
            self.hparams.num_classes = n  # saved with checkpoints, so loading rebuilds the classifier
            self._build_classifier(n)
            self.to(self.device)
        super().setup(stage)
        if stage == "fit" and self.hparams.init_backbone and not self._init_loaded and self.trainer.ckpt_path is None:
            self.load_init_backbone()

    def load_init_backbone(self, path: str | None = None) -> dict[str, Any]:
        """Copy the backbone of ``path`` (default ``init_backbone``: a Lightning checkpoint of any method of this
        framework, or an exported backbone) into this method's backbone and its EMA copy; returns what was loaded."""
        from ssl_lightning.evaluation.checkpoint import load_backbone

        path = path or self.hparams.init_backbone
        source, info = load_backbone(path)
        hp = self.hparams
        mine = (hp.backbone, dict(hp.backbone_kwargs or {}), int(hp.in_channels))
        theirs = (info["backbone"], dict(info["backbone_kwargs"]), int(info["in_channels"]))
        if mine != theirs:
            raise SSLError(f"init_backbone {path!r} holds backbone {theirs[0]!r} with options {theirs[1]} on "
                           f"{theirs[2]} channels, but this model is {mine[0]!r} with {mine[1]} on {mine[2]}: set "
                           f"model.backbone / model.backbone_kwargs to the pretraining run's (or pick a checkpoint "
                           "of this backbone).")
        self.backbone.load_state_dict(source.state_dict())
        if self.ema_backbone is not None:
            self.ema_backbone.load_state_dict(self.backbone.state_dict())
        self._init_loaded = True
        return info

    # ---- optimizer -------------------------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """``lr`` as given (the papers state it for their batch)."""
        return self.hparams.lr

    def lr_factor(self, step: int, warmup_steps: int, total_steps: int, steps_per_epoch: int) -> float:
        hp = self.hparams
        if hp.lr_schedule == "fixmatch":
            return fixmatch_lr_factor(step, total_steps)
        if hp.lr_schedule == "tempens":
            epoch = step / steps_per_epoch
            num_epochs = total_steps / steps_per_epoch
            return sigmoid_rampup(epoch, hp.warmup_epochs) * tempens_rampdown(epoch, num_epochs, hp.rampdown_epochs) \
                if hp.rampdown_epochs > 0 else sigmoid_rampup(epoch, hp.warmup_epochs)
        if hp.lr_schedule == "constant":
            return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warmup_cosine(step, warmup_steps, total_steps, hp.min_lr_ratio)


__all__ = ["SemiBatch", "SemiSupervisedMethod"]
