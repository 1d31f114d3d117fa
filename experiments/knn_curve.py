"""A callback that prints the kNN top-1 at every validation, for learning-check variants that validate more
often than once (a learning curve from one run)::

    python experiments/learning_check.py dim:12 --variant e12 -- --trainer.check_val_every_n_epoch 3 \
        --trainer.callbacks+=experiments.knn_curve.KNNCurve
"""
from __future__ import annotations

import time

from lightning.pytorch import Callback, LightningModule, Trainer


class KNNCurve(Callback):
    """Prints ``epoch N: kNN top-1 X (S s)`` after each validation that logged ``val/knn_top1`` (sanity check
    excluded), S the seconds since the fit started."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.time()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        knn = trainer.callback_metrics.get("val/knn_top1")
        if knn is not None and not trainer.sanity_checking:
            print(f"[knn_curve] epoch {trainer.current_epoch + 1}: kNN top-1 {float(knn):.4f} "
                  f"({time.time() - self.start:.0f} s)", flush=True)
