"""Online linear probe: a linear classifier on detached features, trained alongside pretraining."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class OnlineLinearProbe(nn.Module):
    """Trains on ``features.detach()``, so it never changes the backbone; labels -1 are ignored."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=-1,
                                             validate_args=False)  # no value checks: they would wait on the device
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=-1)
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", ignore_index=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.detach())

    def training_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self(features)
        self.train_top1.update(logits, labels)  # ignores -1
        # mean over the labelled samples, 0 for an all-unlabelled (e.g. STL-10) batch; no host sync
        n = (labels >= 0).sum().clamp(min=1)
        return F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / n

    @torch.no_grad()
    def validation_update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        logits = self(features)
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)
