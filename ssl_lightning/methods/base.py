"""``SSLMethod``: what every pretraining method shares, so a method file holds only its heads and loss.

A method subclasses :class:`SSLMethod`, builds its heads in ``__init__`` and implements
:meth:`SSLMethod.loss`. The base class runs the backbone over the views (multi-crop aware), trains the
online linear probe, builds the optimizer (no weight decay on norm and bias parameters; the learning
rate is given per 256 images and scaled by the global batch), the per-step warm-up + cosine schedule,
the momentum (EMA) update of any teacher the method declares in :meth:`momentum_pairs`, and the guard
that stops a run whose loss became NaN or inf (:mod:`ssl_lightning.modules.nonfinite`).
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.data.datamodule import VAL
from ssl_lightning.modules.ema import cosine_momentum, ema_update
from ssl_lightning.modules.nonfinite import NonFiniteGuard, NonFiniteMode
from ssl_lightning.modules.probe import OnlineLinearProbe
from ssl_lightning.optim import build_optimizer, param_groups, warmup_cosine
from ssl_lightning.resume import rng_states, set_rng_states

LossOutput = torch.Tensor | dict[str, torch.Tensor]


class SSLMethod(L.LightningModule):
    """Base LightningModule of every self-supervised method.

    Args:
        backbone: a registered backbone name (``ssl_lightning.backbones.BACKBONES``).
        backbone_kwargs: its options, e.g. ``{"cifar_stem": true}``.
        in_channels: image channels (the CLI links it from the data).
        num_classes: classes of the online probe; None = read from the datamodule, 0 = no probe.
        optimizer: ``sgd``, ``lars`` or ``adamw``.
        lr: learning rate per 256 images; the optimizer gets ``lr * global_batch / 256``.
        weight_decay: on weights only (biases and norm parameters get none).
        momentum: SGD / LARS momentum. betas: AdamW's.
        warmup_epochs: linear warm-up length (fractions allowed); then cosine decay to
            ``min_lr_ratio * lr``, updated every step.
        probe_lr: the probe's own (unscaled) learning rate, no weight decay.
        channels_last: keep the model and the views in channels-last memory format: faster convolutions
            on GPUs with tensor cores (especially with bf16 / fp16 mixed precision) and on CPUs through
            oneDNN (on this project's CPU the small ConvNet's training step 1.3-1.4x, ResNet-18's 1.1x;
            ``experiments/bench/throughput.py``).
        compile: ``torch.compile`` the backbone in place (state-dict keys unchanged, so checkpoints load
            either way); the first steps are slower while it compiles.
        on_nonfinite: what a NaN / inf loss or loss term (``loss()``'s terms and the probe's loss) does.
            ``"stop"``: the run stops with a ``NonFiniteLossError`` naming the first bad step, the terms,
            the learning rate and the usual fixes; checked every ``trainer.log_every_n_steps`` batches (no
            per-step device sync), before validation and before every checkpoint (none is written after the
            bad step). ``"skip"``: such a step's update is dropped (parameters, optimizer state and EMA
            teachers unchanged), counted as ``train/skipped_steps`` and warned about; this reads the loss back
            after every step (one device sync per step, as AMP's GradScaler).
        max_consecutive_skips: with ``"skip"``, stop anyway after this many non-finite steps in a row (0 = never).
    """

    #: run views of equal shape through the backbone in one batch (False: one pass per view)
    concat_views: bool = True
    #: train the online linear probe on the features (False: methods with their own classifier, semi-supervised)
    online_probe: bool = True

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        num_classes: int | None = None,
        optimizer: str = "sgd",
        lr: float = 0.3,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 10,
        min_lr_ratio: float = 0.0,
        probe_lr: float = 0.1,
        channels_last: bool = False,
        compile: bool = False,
        on_nonfinite: NonFiniteMode = "stop",
        max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, in_channels=in_channels, **(backbone_kwargs or {}))
        self.probe: OnlineLinearProbe | None = None
        if num_classes and self.online_probe:
            self.probe = OnlineLinearProbe(self.backbone.num_features, num_classes)
        self._ema_step = -1
        self.nonfinite = NonFiniteGuard(on_nonfinite, max_consecutive_skips)
        self._resumed: dict[str, Any] | None = None  # what on_load_checkpoint read, applied in on_train_start
        if compile:
            self.backbone.compile()

    # ---- to implement / override in methods -----------------------------------------------------
    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> LossOutput:
        """The method's objective from the backbone features of each view (``feats[i]`` for
        ``views[i]``). Return the loss, or a dict with ``"loss"`` and other terms to log."""
        raise NotImplementedError

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(student, teacher)`` pairs updated by EMA after every optimizer step, with momentum
        following ``cosine_momentum(step, total, self.hparams.momentum_base, self.hparams.momentum_final)``."""
        return []

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Optional groups with their own settings (e.g. ``{"params": ..., "fixed_lr": True}``);
        their parameters are left out of the default groups."""
        return []

    def class_probabilities(self, feats: torch.Tensor) -> torch.Tensor | None:
        """``(B, C)`` class probabilities from backbone features, for methods with a class head
        (TWIST); scored by :class:`~ssl_lightning.callbacks.ClusterMonitor` and ``ssl-lightning cluster``."""
        return None

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, the representation that probes and evaluations use."""
        return self.backbone(x)

    def forward_views(self, views: list[torch.Tensor], network: nn.Module | None = None) -> list[torch.Tensor]:
        """``network`` (default: the backbone) applied to each view; consecutive views of the same
        shape share one pass when ``concat_views`` (multi-crop: globals together, locals together)."""
        network = network or self.backbone
        if not self.concat_views:
            return [network(v) for v in views]
        out: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            out.extend(network(torch.cat(views[start:end])).chunk(end - start))
            start = end
        return out

    # ---- steps ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views, labels, index = batch
        if self.hparams.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        feats = self.forward_views(views)
        out = self.loss(feats, views, index)
        terms = dict(out) if isinstance(out, dict) else {"loss": out}
        loss = terms["loss"]
        bs = views[0].shape[0]
        self.log_terms(terms, bs)
        if self.probe is not None:
            terms["probe_loss"] = probe_loss = self.probe.training_loss(feats[0], labels)
            self.log("train/probe_loss", probe_loss, batch_size=bs)
            self.log("train/probe_top1", self.probe.train_top1, batch_size=bs)
            loss = loss + probe_loss
        self.nonfinite.observe(self, terms)  # NaN / inf: device-side flags (skip mode: decided now)
        return loss

    def log_terms(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        """``train/loss`` (progress bar) and ``train/<name>`` for every other term of the step."""
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=batch_size)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images, labels = batch
        feats = self(images)
        if dataloader_idx == VAL and self.probe is not None:
            self.probe.validation_update(feats, labels)
            self.log("val/probe_top1", self.probe.val_top1, prog_bar=True, add_dataloader_idx=False)
            self.log("val/probe_top5", self.probe.val_top5, add_dataloader_idx=False)
        return {"features": feats, "labels": labels}  # read by the KNNMonitor callback

    # ---- set-up -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.online_probe and self.hparams.num_classes is None and self.probe is None:
            n = int(getattr(self.trainer.datamodule, "num_classes", 0) or 0)
            self.hparams.num_classes = n  # saved with checkpoints, so loading rebuilds the probe
            if n:
                self.probe = OnlineLinearProbe(self.backbone.num_features, n).to(self.device)

    def global_batch_size(self) -> int:
        dm = self.trainer.datamodule
        per_device = getattr(dm, "batch_size", None) or self.trainer.train_dataloader.batch_size
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches)  # also sets up the train loader
        scaled_lr = self.learning_rate()
        extra = self.extra_param_groups()
        taken = {id(p) for g in extra for p in g["params"]} | {id(p) for p in (self.probe.parameters() if self.probe else [])}
        groups = param_groups((p for p in self.parameters() if id(p) not in taken), hp.weight_decay) + extra
        if self.probe is not None:
            groups.append({"params": list(self.probe.parameters()), "weight_decay": 0.0, "lr": hp.probe_lr, "name": "probe"})
        for g in groups:
            g.setdefault("lr", scaled_lr)
            g.setdefault("weight_decay", hp.weight_decay)
        optimizer = build_optimizer(hp.optimizer, groups, scaled_lr, hp.momentum, tuple(hp.betas),
                                    nesterov=bool(hp.get("nesterov", False)))

        per_epoch = max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)
        warmup = int(round(hp.warmup_epochs * per_epoch))
        schedule = lambda step: self.lr_factor(step, warmup, total, per_epoch)  # noqa: E731
        lambdas = [(lambda step: 1.0) if g.get("fixed_lr") else schedule for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def learning_rate(self) -> float:
        """The optimizer's base learning rate: ``lr`` is given per 256 images, scaled by the global batch."""
        global_batch = self.global_batch_size()
        scaled_lr = self.hparams.lr * global_batch / 256
        rank_zero_info(f"[ssl_lightning] learning rate {self.hparams.lr} per 256 images x global batch {global_batch} / 256 = {scaled_lr:.6g}")
        return scaled_lr

    def lr_factor(self, step: int, warmup_steps: int, total_steps: int, steps_per_epoch: int) -> float:
        """The learning-rate factor of optimizer step ``step``: linear warm-up, then cosine to ``min_lr_ratio``."""
        return warmup_cosine(step, warmup_steps, total_steps, self.hparams.min_lr_ratio)

    # ---- momentum teachers --------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._ema_step = self.trainer.global_step
        self.nonfinite.start()
        resumed, self._resumed = self._resumed, None
        if resumed is not None and self.trainer.ckpt_path is not None:  # a resumed fit, not load_from_checkpoint
            if resumed.get("teacher_update_pending"):
                self.update_teachers()
            set_rng_states(resumed["rng_states"], self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.nonfinite.after_batch(self)  # every log_every_n_steps batches: raises if a loss was NaN / inf
        if self.momentum_pairs() and self.trainer.global_step != self._ema_step:  # after an optimizer step
            m = self.update_teachers()
            if m is not None:
                self.log("train/teacher_momentum", m)

    @torch.no_grad()
    def update_teachers(self) -> float | None:
        """The EMA update after optimizer step ``global_step - 1``; returns its momentum (None: the step's update
        was dropped by ``on_nonfinite=skip``, and the teachers stay too)."""
        self._ema_step = self.trainer.global_step
        if self.nonfinite.update_dropped:  # on_nonfinite=skip dropped this step: the teachers stay too
            return None
        m = self.teacher_momentum()
        for student, teacher in self.momentum_pairs():
            ema_update(teacher, student, m)
        return m

    def teacher_momentum(self) -> float:
        """Momentum for the update after optimizer step ``global_step - 1`` (BYOL's cosine schedule)."""
        return cosine_momentum(self.trainer.global_step - 1, int(self.trainer.estimated_stepping_batches),
                               self.hparams.momentum_base, self.hparams.momentum_final)

    # ---- non-finite losses (the checks of the guard that training_step feeds) -------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        self.nonfinite.drop_update(optimizer)  # on_nonfinite=skip: a non-finite step's gradients are discarded

    def on_validation_start(self) -> None:
        self.nonfinite.check(self)  # no validation (kNN, probe, clusters) of a model that already went NaN

    def on_train_end(self) -> None:
        self.nonfinite.finish(self)  # a non-finite step after the last check

    # ---- checkpoints: no non-finite state; exact resume (also mid-epoch; the data position is the datamodule's) ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a non-finite state (the NaN guard raises, which aborts the write). Saves the global RNG states
        (rank 0's: every process restores them), so that a loss drawing from the global RNG continues with the same
        numbers, and whether the teachers' EMA update of the last optimizer step is still to come:
        ``ModelCheckpoint(every_n_train_steps)`` saves in the callbacks' ``on_train_batch_end``, which runs before
        this module's (the update). Both are applied when the fit resumes."""
        self.nonfinite.check(self, checkpoint["state_dict"])
        pending = bool(self.momentum_pairs()) and 0 <= self._ema_step != self.trainer.global_step
        checkpoint["ssl_lightning"] = {"rng_states": rng_states(self.device), "teacher_update_pending": pending}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed = checkpoint.get("ssl_lightning")

    # ---- weight-decay schedule (DINO, TWIST-ViT: methods with a ``weight_decay_end`` hyperparameter) ---------
    def weight_decay_at(self, step: int) -> float:
        """Cosine from ``weight_decay`` to ``weight_decay_end`` over all optimizer steps (DINO's cosine_scheduler)."""
        hp, total = self.hparams, max(1, int(self.trainer.estimated_stepping_batches))
        progress = min(step / total, 1.0)
        return hp.weight_decay_end + 0.5 * (hp.weight_decay - hp.weight_decay_end) * (1 + math.cos(math.pi * progress))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.hparams.get("weight_decay_end") is None:
            return
        wd = self.weight_decay_at(self.trainer.global_step)
        for group in self.trainer.optimizers[0].param_groups:
            if group["weight_decay"] > 0:  # the decayed group; biases, norms and the probe have 0
                group["weight_decay"] = wd
        self.log("train/weight_decay", wd)
