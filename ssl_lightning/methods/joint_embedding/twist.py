"""TWIST (Wang et al., "Self-Supervised Learning by Estimating Twin Class Distributions", 2021)."""
from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.twist import (diversity, multicrop_twist_loss, self_label_loss, self_label_quantile, sharpness,
                                        teacher_twist_loss)
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules.ema import momentum_copy
from ssl_lightning.optim import warmup_cosine
from ssl_lightning.registry import SSLError


class TWISTHead(nn.Module):
    """``in -> hidden -> hidden -> C`` MLP (Linear-BN-ReLU hidden layers), then ``BatchNorm1d(C,
    affine=False)`` before the softmax ("NBS", official ``lbn_type='bn'``) or nothing (``nbs=False``:
    the ablation, with a bias on the last layer instead)."""

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 4096, nlayers: int = 3,
                 nbs: bool = True, trunc_init: bool = False) -> None:
        super().__init__()
        self.mlp = mlp([in_dim] + [hidden_dim] * (nlayers - 1) + [out_dim], last_bias=not nbs)
        self.norm = nn.BatchNorm1d(out_dim, affine=False) if nbs else nn.Identity()
        if trunc_init:  # the official head's initialisation with ViT backbones
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.02)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(x))


@METHODS.register("twist")
class TWIST(SSLMethod):
    """Twin class distributions: a siamese network ending in a C-way softmax (bytedance/TWIST train.py, engine.py).

    ``p = softmax(BN(head(f)) / tau)``; ``L = 1/2 [KL(p1||p2) + KL(p2||p1)] + (1 + lambda1) mean_b H(p_b)
    - lambda2 H(mean_b p_b)``, averaged over the official multi-crop pairs (each global crop with every
    later crop; :func:`~ssl_lightning.losses.joint_embedding.twist.multicrop_pairs`). The head sees all crops in one pass,
    so its BatchNorms normalise over all crops together, as officially.

    With ``momentum_teacher`` (the official ViT recipe) the consistency is ``KL(teacher_t || p_s)`` from
    an EMA teacher's two global crops to every other student crop; sharpness and diversity stay on the student.

    Self-labelling (the last ``self_label_epochs`` epochs): the target is the argmax of the more confident
    global view (teacher's, if any), samples above the confidence threshold of the global batch (kept
    fraction ``quantile``: cosine ``quantile_start -> quantile_end`` over the stage) give cross-entropy to
    every other view; lr ``self_label_lr`` per 256 images with its own ``self_label_warmup_epochs``
    warm-up and cosine. (The official code also switches to harder crops, 0.14-1 / 0.05-0.14, for this
    stage; here the data module's views stay as configured.)

    Args:
        out_dim: C, the number of classes (4096). hidden_dim, nlayers: head 2048 -> 4096 -> 4096 -> C.
        nbs: batch normalisation (no affine) before the softmax; False = the paper's ablation.
        lambda1, lambda2: weights of sharpness (1 + lambda1) and diversity (lambda2); 0 and 1 (ViT: -0.6, 1).
        tau: softmax temperature (1). eps: inside the logs (1e-5).
        n_global_crops: the first views that are global crops (2).
        momentum_teacher: EMA teacher (backbone + head), momentum cosine ``momentum_base -> momentum_final``.
        weight_decay_end: cosine weight-decay schedule to this value (ViT); None = constant.
        Defaults: LARS, lr 0.5 per 256 images, weight decay 1.5e-6 (ResNet recipe).
    """

    def __init__(self, out_dim: int = 4096, hidden_dim: int = 4096, nlayers: int = 3, nbs: bool = True,
                 lambda1: float = 0.0, lambda2: float = 1.0, tau: float = 1.0, eps: float = 1e-5,
                 n_global_crops: int = 2, self_label_epochs: int = 0, quantile_start: float = 0.5,
                 quantile_end: float = 0.6, self_label_lr: float | None = 0.05, self_label_warmup_epochs: float = 5,
                 momentum_teacher: bool = False, momentum_base: float = 0.996, momentum_final: float = 1.0,
                 weight_decay_end: float | None = None, optimizer: str = "lars", lr: float = 0.5,
                 weight_decay: float = 1.5e-6, **kwargs) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        if nlayers < 1 or out_dim < 2:
            raise SSLError(f"TWIST needs nlayers >= 1 and out_dim (classes) >= 2, got {nlayers} and {out_dim}.")
        trunc_init = str(self.hparams.backbone).startswith("vit")
        self.head = TWISTHead(self.backbone.num_features, out_dim, hidden_dim, nlayers, nbs, trunc_init)
        if momentum_teacher:
            self.teacher_backbone = momentum_copy(self.backbone)
            self.teacher_head = momentum_copy(self.head)

    def momentum_pairs(self):
        if not self.hparams.momentum_teacher:
            return []
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    # ---- objective ----------------------------------------------------------------------------------
    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        hp, bs = self.hparams, feats[0].shape[0]
        pre_norm = self.head.mlp(torch.cat(feats))  # one pass over all crops
        logits = self.head.norm(pre_norm)
        probs = [z.softmax(dim=1) for z in (logits / hp.tau).split(bs)]
        teacher = None
        if hp.momentum_teacher:
            with torch.no_grad():  # the teacher sees the two global crops
                t = self.teacher_head(torch.cat(self.forward_views(views[:hp.n_global_crops], self.teacher_backbone)))
                teacher = [z.softmax(dim=1) for z in (t / hp.tau).split(bs)]
        quantile = self.self_label_quantile()
        if quantile is not None:
            targets = teacher if teacher is not None else [p.detach() for p in probs[:2]]
            out = self_label_loss(targets, logits.split(bs), quantile)
            out["quantile"] = torch.tensor(quantile)
            with torch.no_grad():  # monitored, as officially: the global views' sharpness and diversity
                out["sharpness"] = (sharpness(probs[0], hp.eps) + sharpness(probs[1], hp.eps)) / 2
                out["diversity"] = (diversity(probs[0], hp.eps) + diversity(probs[1], hp.eps)) / 2
        elif teacher is not None:
            out = teacher_twist_loss(teacher, probs, hp.lambda1, hp.lambda2, hp.eps)
        else:
            out = multicrop_twist_loss(probs, hp.lambda1, hp.lambda2, hp.eps, hp.n_global_crops)
        with torch.no_grad():  # column (per class over the batch) and row (per sample over classes) std
            out["std_col"], out["std_row"] = logits.std(0, unbiased=False).mean(), logits.std(1, unbiased=False).mean()
            out["std_col_pre_norm"] = pre_norm.std(0, unbiased=False).mean()
            out["std_row_pre_norm"] = pre_norm.std(1, unbiased=False).mean()
        return out

    @torch.no_grad()
    def class_probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """``softmax(head(f) / tau)`` with the head in eval mode (BN running statistics): ``(B, C)``."""
        was_training = self.head.training
        self.head.eval()
        try:
            return (self.head(feats) / self.hparams.tau).softmax(dim=1)
        finally:
            self.head.train(was_training)

    # ---- self-labelling stage -----------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)

    def self_label_start_epoch(self) -> int | None:
        n = self.hparams.self_label_epochs
        if not n:
            return None
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 0 or n >= max_epochs:
            raise SSLError(f"self_label_epochs ({n}) must be smaller than trainer.max_epochs ({max_epochs}): the "
                           f"self-labelling stage is the last self_label_epochs epochs of training.")
        return max_epochs - n

    def self_label_quantile(self) -> float | None:
        """The kept fraction of the current step, or None in the main stage."""
        start = self.self_label_start_epoch() if self._trainer is not None else None
        if start is None or self.current_epoch < start:
            return None
        per_epoch = self.steps_per_epoch()
        return self_label_quantile(self.global_step - start * per_epoch, self.hparams.self_label_epochs * per_epoch,
                                   self.hparams.quantile_start, self.hparams.quantile_end)

    def configure_optimizers(self):
        config = super().configure_optimizers()
        hp, start = self.hparams, self.self_label_start_epoch()
        if start is None:
            return config
        # official adjust_learning_rate: warm-up + cosine over the main stage, then the self-labelling lr
        # (self_label_lr per 256 images) with its own warm-up + cosine over the remaining steps
        optimizer, per_epoch = config["optimizer"], self.steps_per_epoch()
        total, main = int(self.trainer.estimated_stepping_batches), start * per_epoch
        warmup, sl_warmup = int(round(hp.warmup_epochs * per_epoch)), int(round(hp.self_label_warmup_epochs * per_epoch))
        ratio = 1.0 if hp.self_label_lr is None else hp.self_label_lr / hp.lr

        def staged(step: int) -> float:
            if step < main:
                return warmup_cosine(step, warmup, main, hp.min_lr_ratio)
            return ratio * warmup_cosine(step - main, sl_warmup, total - main, hp.min_lr_ratio)

        plain = lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)  # noqa: E731
        lambdas = [(lambda step: 1.0) if g.get("fixed_lr") else plain if g.get("name") == "probe" else staged
                   for g in optimizer.param_groups]
        for g in optimizer.param_groups:  # undo the base scheduler's first step before the new one starts
            g["lr"] = g["initial_lr"]
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return config
