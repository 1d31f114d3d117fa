"""Temporal ensembling's per-sample ensemble predictions (Laine & Aila 2017; tempens ``train.py``)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_lightning import distributed


class TemporalEnsemble(nn.Module):
    """Per-sample ensemble ``Z`` of the training-pass predictions, held in buffers (saved in checkpoints).

    * :meth:`record` stores this step's predictions ``z`` (softmax outputs) of the samples ``index``; under
      DDP the rows of every process are gathered and written in rank order, so every process holds the
      same state.
    * :meth:`end_epoch`, called once after each epoch, folds them in: ``Z <- a Z + (1 - a) z`` (a = 0.6).
    * :meth:`targets` are ``Z / (1 - a^t)``, the bias-corrected ensemble, ``t`` the number of epochs that
      updated the sample (tempens's ``t``, epochs since the start, when every sample is seen every epoch);
      0 for a sample not yet updated (targets start at 0).

    A sample seen twice in an epoch keeps its last prediction (tempens overwrites too); one not seen in an
    epoch is left as it was (its own ``t`` does not advance, so its correction stays exact).
    """

    def __init__(self, num_samples: int, num_classes: int, decay: float = 0.6) -> None:
        super().__init__()
        if num_samples <= 0 or num_classes <= 0:
            raise ValueError(f"TemporalEnsemble needs num_samples, num_classes > 0, got {num_samples}, {num_classes}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"TemporalEnsemble needs a decay in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ensemble", torch.zeros(num_samples, num_classes))  # Z
        self.register_buffer("epoch_predictions", torch.zeros(num_samples, num_classes))  # this epoch's z
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))  # recorded this epoch
        self.register_buffer("updates", torch.zeros(num_samples, dtype=torch.long))  # t of each sample
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def record(self, index: Tensor, predictions: Tensor, gather: bool = True) -> None:
        """Store the predictions ``(B, C)`` of samples ``index`` (B,) for this epoch's update."""
        if gather:
            index, predictions = distributed.gather(index), distributed.gather(predictions.detach())
        index = index.to(self.seen.device)
        # duplicates (e.g. one image twice in a global batch): the last row wins, deterministically
        order = torch.sort(index, stable=True)
        last = torch.ones_like(index, dtype=torch.bool)
        last[:-1] = order.values[1:] != order.values[:-1]
        rows = order.indices[last]
        self.epoch_predictions[index[rows]] = predictions[rows.to(predictions.device)].to(self.ensemble)
        self.seen[index[rows]] = True

    @torch.no_grad()
    def end_epoch(self) -> None:
        """``Z <- a Z + (1 - a) z`` for the samples recorded this epoch; then a new epoch starts."""
        seen = self.seen
        self.ensemble[seen] = self.decay * self.ensemble[seen] + (1 - self.decay) * self.epoch_predictions[seen]
        self.updates[seen] += 1
        self.seen.zero_()
        self.epochs_done += 1

    def targets(self, index: Tensor) -> Tensor:
        """``Z / (1 - a^t)`` of samples ``index`` (0 where t = 0)."""
        t = self.updates[index].to(self.ensemble.dtype)
        correction = 1.0 - torch.pow(torch.full_like(t, self.decay), t)
        z = self.ensemble[index]
        return torch.where(t[:, None] > 0, z / correction.clamp(min=1e-12)[:, None], torch.zeros_like(z))
