"""Embedding plots during training: a t-SNE / UMAP map of the validation features every N epochs."""
from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from ssl_lightning.data.datamodule import VAL
from ssl_lightning.evaluation.embed import DISPLAY_NAMES, METHODS, dataset_class_names, plot_embedding
from ssl_lightning.registry import SSLError


class EmbeddingPlot(L.Callback):
    """Writes ``<run_dir>/embeddings/epoch{E:03d}.png`` (``E`` counted from 0, as the checkpoints are)
    after the validation of every ``every_n_epochs``-th epoch and of the last one: a 2-D ``method``
    map (``tsne`` or ``umap``) of the validation-set features (validation loader 1), coloured by
    class. With a :class:`WandbLogger` the image is also logged as ``val/embedding``. Under DDP the
    features of every process are gathered and rank 0 plots. Needs ``validation_step`` to return
    ``{"features": ..., "labels": ...}`` (as :class:`SSLMethod` does).
    """

    def __init__(self, every_n_epochs: int = 10, method: str = "tsne", max_points: int = 2000, seed: int = 0,
                 dirname: str = "embeddings") -> None:
        if every_n_epochs < 1:
            raise SSLError(f"EmbeddingPlot: every_n_epochs must be >= 1, got {every_n_epochs}.")
        if method.lower() not in METHODS:
            raise SSLError(f"EmbeddingPlot: unknown method {method!r}: use 'tsne' or 'umap'.")
        self.every_n_epochs, self.method, self.max_points, self.seed = every_n_epochs, method.lower(), max_points, seed
        self.dirname = dirname
        self.paths: list[str] = []  # the files written so far
        self._feats: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = (trainer.max_epochs or -1) > 0 and epoch + 1 >= trainer.max_epochs
        return not trainer.sanity_checking and ((epoch + 1) % self.every_n_epochs == 0 or last)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._feats.clear()
        self._labels.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx != VAL or not isinstance(outputs, dict) or "features" not in outputs or not self._due(trainer):
            return
        self._feats.append(outputs["features"].detach())
        self._labels.append(outputs["labels"].detach())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._feats:
            return
        feats, labels = torch.cat(self._feats), torch.cat(self._labels)
        self.on_validation_epoch_start(trainer, pl_module)  # free the features
        if trainer.world_size > 1:  # every process takes part in the gather
            feats, labels = pl_module.all_gather(feats).flatten(0, 1), pl_module.all_gather(labels).flatten(0, 1)
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        path = os.path.join(trainer.default_root_dir, self.dirname, f"epoch{epoch:03d}.png")
        names = dataset_class_names(getattr(trainer.datamodule, "val_set", None)) if trainer.datamodule else None
        plot_embedding(feats.cpu(), labels.cpu(), path, self.method, names, self.seed, self.max_points,
                       title=f"{DISPLAY_NAMES[self.method]} of validation features, epoch {epoch}")
        self.paths.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/embedding", [path], step=trainer.global_step, caption=[f"epoch {epoch}"])
