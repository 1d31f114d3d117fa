"""Online kNN monitor: weighted kNN accuracy of the backbone's features at every validation."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from ssl_lightning.data.datamodule import TRAIN_EVAL, VAL
from ssl_lightning.evaluation.knn import weighted_knn


class KNNMonitor(L.Callback):
    """Logs ``val/knn_top1``: un-augmented training features form the bank (validation loader 0),
    validation features are the queries (loader 1). Under DDP the bank is gathered from every
    process and correct counts are summed (Lightning's DistributedSampler may repeat up to
    ``world_size - 1`` samples to even out the shards). ``data.eval_subset`` bounds the bank. Needs ``validation_step`` to return
    ``{"features": ..., "labels": ...}`` (as :class:`SSLMethod` does).

    With ``num_sanity_val_steps: -1`` the sanity check is a full validation before training, and the
    kNN accuracy of the initial (e.g. randomly initialised) backbone is printed and kept in
    ``initial_accuracy``: the baseline a pretraining run should beat.
    """

    def __init__(self, k: int = 200, temperature: float = 0.1, chunk_size: int = 1024) -> None:
        self.k, self.temperature, self.chunk_size = k, temperature, chunk_size
        self._feats: dict[int, list[torch.Tensor]] = {TRAIN_EVAL: [], VAL: []}
        self._labels: dict[int, list[torch.Tensor]] = {TRAIN_EVAL: [], VAL: []}
        self.initial_accuracy: float | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for store in (self._feats, self._labels):
            for v in store.values():
                v.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "features" not in outputs:
            return
        self._feats[dataloader_idx].append(outputs["features"].detach())
        self._labels[dataloader_idx].append(outputs["labels"].detach())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        full = trainer.num_sanity_val_steps == float("inf")  # num_sanity_val_steps: -1
        if (trainer.sanity_checking and not full) or not self._feats[TRAIN_EVAL] or not self._feats[VAL]:
            return
        bank, bank_labels = torch.cat(self._feats[TRAIN_EVAL]), torch.cat(self._labels[TRAIN_EVAL])
        if trainer.world_size > 1:
            bank = pl_module.all_gather(bank).flatten(0, 1)
            bank_labels = pl_module.all_gather(bank_labels).flatten(0, 1)
        queries, labels = torch.cat(self._feats[VAL]), torch.cat(self._labels[VAL])
        num_classes = int(max(bank_labels.max(), labels.max())) + 1
        preds = weighted_knn(bank, bank_labels, queries, num_classes, self.k, self.temperature, self.chunk_size)
        counts = torch.stack([(preds == labels).sum(), torch.tensor(labels.numel(), device=labels.device)]).float()
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if trainer.sanity_checking:
            self.initial_accuracy = float(counts[0] / counts[1])
            rank_zero_info(f"[ssl_lightning] kNN top-1 before training: {self.initial_accuracy:.4f}")
            return
        pl_module.log("val/knn_top1", counts[0] / counts[1], prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.on_validation_epoch_start(trainer, pl_module)  # free the features
