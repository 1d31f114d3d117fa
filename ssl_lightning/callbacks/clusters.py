"""Unsupervised classification monitor for methods with a class head (TWIST)."""
from __future__ import annotations

import lightning as L
import torch

from ssl_lightning.data.datamodule import VAL
from ssl_lightning.evaluation.clustering import cluster_metrics


class ClusterMonitor(L.Callback):
    """Logs ``val/nmi``, ``val/ami``, ``val/ari`` and ``val/acc`` (Hungarian) of the argmax class of
    ``pl_module.class_probabilities(features)`` on the validation set. Does nothing for methods whose
    ``class_probabilities`` returns None (most methods: they have no class head). Under DDP the
    predictions and labels of every process are gathered before scoring."""

    def __init__(self) -> None:
        self._pred: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._pred.clear()
        self._labels.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx != VAL or not isinstance(outputs, dict) or "features" not in outputs:
            return
        probs = getattr(pl_module, "class_probabilities", lambda f: None)(outputs["features"])
        if probs is not None:
            self._pred.append(probs.argmax(dim=1).detach())
            self._labels.append(outputs["labels"].detach())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._pred:
            return
        pred, labels = torch.cat(self._pred), torch.cat(self._labels)
        if trainer.world_size > 1:
            pred, labels = pl_module.all_gather(pred).flatten(0, 1), pl_module.all_gather(labels).flatten(0, 1)
        for name, value in cluster_metrics(pred, labels).items():
            pl_module.log(f"val/{name}", value, sync_dist=False, rank_zero_only=False)
        self.on_validation_epoch_start(trainer, pl_module)
