"""Supervised evaluation of a pretrained backbone: a linear classifier on its frozen features (linear
evaluation, MoCo / SimSiam protocols) or on the whole network trained end to end (fine-tuning).

Linear evaluation keeps the backbone in eval mode (BN statistics fixed, no gradients) whatever mode
Lightning puts the module in; the head starts from N(0, 0.01) weights and zero bias (MoCo's lincls).
``optimizer="lars"`` is LARC as in SimSiam's linear evaluation (apex LARC, clip off): SGD whose
per-parameter gradient ``g + wd p`` is scaled by ``trust * ||p|| / (||g|| + wd ||p||)`` -- applied
whatever the weight decay (lightly's LARS skips parameters without weight decay, which for the
SimSiam protocol, weight decay 0, would be plain SGD).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from ssl_lightning.optim import build_optimizer, warmup_cosine
from ssl_lightning.registry import SSLError

SCHEDULES = ("cosine", "step", "constant")


@torch.no_grad()
def larc_(params, weight_decay: float, trust: float = 1e-3, eps: float = 1e-8) -> None:
    """In place: ``grad <- (grad + wd * p) * trust * ||p|| / (||grad|| + wd * ||p|| + eps)`` (LARC, You et al. 2017)."""
    for p in params:
        if p.grad is None:
            continue
        p_norm, g_norm = p.norm(), p.grad.norm()
        if weight_decay:
            p.grad.add_(p, alpha=weight_decay)
        if p_norm > 0 and g_norm > 0:
            p.grad.mul_(trust * p_norm / (g_norm + weight_decay * p_norm + eps))


class Classifier(L.LightningModule):
    """Backbone + linear head, cross-entropy on labelled images; top-1 / top-5 on the validation set.

    Args:
        backbone: features ``(B, D)`` with ``num_features = D`` (``nn.Identity`` for cached features).
        num_classes: classes of the head.
        freeze_backbone: linear evaluation (True) or fine-tuning (False).
        optimizer: ``sgd``, ``lars`` (LARC, see the module docstring) or ``adamw``.
        lr: the head's learning rate per 256 images (scaled by the global batch / 256).
        backbone_lr: the backbone's (fine-tuning), per 256 images; None = ``lr``.
        weight_decay: on every parameter of the optimised groups. momentum: SGD / LARC momentum.
        schedule: ``cosine`` (per step, to 0), ``step`` (x0.1 at each fraction of ``milestones`` of
            training, MoCo's 60 / 80 of 100 epochs) or ``constant``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, freeze_backbone: bool = True, optimizer: str = "sgd",
                 lr: float = 30.0, backbone_lr: float | None = None, weight_decay: float = 0.0, momentum: float = 0.9,
                 schedule: str = "cosine", milestones: tuple[float, ...] = (0.6, 0.8)) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise SSLError(f"Unknown schedule {schedule!r}. Choose one of: {', '.join(SCHEDULES)}.")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone, self.freeze = backbone, freeze_backbone
        self.head = nn.Linear(int(getattr(backbone, "num_features")), num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        if freeze_backbone:  # Lightning's fit keeps submodules' modes: eval from the start, and in forward
            self.backbone.requires_grad_(False).eval()
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.freeze:
            self.backbone.eval()  # BN running statistics stay those of pretraining
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze:
            if self.backbone.training:
                self.backbone.eval()
            with torch.no_grad():
                feats = self.backbone(x)
            return self.head(feats)
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.top1.update(logits, y)
        self.top5.update(logits, y)
        self.log("val/top1", self.top1, prog_bar=True, batch_size=y.shape[0])
        self.log("val/top5", self.top5, batch_size=y.shape[0])

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.optimizer == "lars":
            for g in optimizer.param_groups:
                larc_(g["params"], g["larc_weight_decay"])

    def configure_optimizers(self):
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        batch = self.trainer.train_dataloader.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        scale = batch / 256
        groups = [{"params": list(self.head.parameters()), "lr": hp.lr * scale, "name": "head"}]
        if not self.freeze:
            blr = hp.lr if hp.backbone_lr is None else hp.backbone_lr
            groups.append({"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": blr * scale,
                           "name": "backbone"})
        name = hp.optimizer.lower()
        for g in groups:  # LARC adds the weight decay itself, before its scaling
            g["weight_decay"], g["larc_weight_decay"] = (0.0, hp.weight_decay) if name == "lars" else (hp.weight_decay, 0.0)
        optimizer = build_optimizer("sgd" if name == "lars" else name, groups, groups[0]["lr"], hp.momentum)
        if hp.schedule == "cosine":
            factor = lambda step: warmup_cosine(step, 0, total)  # noqa: E731
        elif hp.schedule == "step":
            bounds = [round(m * total) for m in hp.milestones]
            factor = lambda step: 0.1 ** sum(step >= b for b in bounds)  # noqa: E731
        else:
            factor = lambda step: 1.0  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit_classifier(model: Classifier, train_loader: DataLoader, val_loader: DataLoader, epochs: int,
                   trainer: dict[str, Any] | None = None) -> tuple[dict[str, float], L.Trainer]:
    """Trains ``model`` for ``epochs`` on ``train_loader`` (training split only) and reports the final
    model's ``top1`` / ``top5`` on ``val_loader`` (no model selection on the validation set)."""
    if len(train_loader.dataset) == 0:
        raise SSLError("The training split is empty: check data.train_subset and the dataset")
    options = {"accelerator": "auto", "devices": 1, "precision": "32-true", "logger": False,
               "enable_checkpointing": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
               **(trainer or {}), "max_epochs": epochs}
    t = L.Trainer(**options)
    t.fit(model, train_dataloaders=train_loader)
    out = t.validate(model, dataloaders=val_loader, verbose=False)[0]
    return {"top1": float(out["val/top1"]), "top5": float(out["val/top5"])}, t

