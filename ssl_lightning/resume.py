"""What an exact resume needs beyond Lightning's own checkpoint state: where the training data stream stands,
and the global random number generators.

Lightning restores the weights, optimizer, schedules and loop counters, but neither re-positions a sampler inside
an epoch nor restores the global RNGs. :class:`~ssl_lightning.data.SSLDataModule` saves :func:`next_batch_position`
so that a run resumed mid-epoch draws the remaining batches of that epoch, and :class:`~ssl_lightning.methods.SSLMethod`
saves :func:`rng_states` so that a loss drawing from the global RNG (dropout, random permutations) continues with
the same numbers. Both are plain tensors and Python values: checkpoints still load with ``weights_only=True``.
"""
from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def next_batch_position(trainer: L.Trainer) -> tuple[int, int]:
    """``(epoch, batches done)``: the epoch the next training batch belongs to and how many of that epoch's
    batches (per process) have already been trained, from the trainer's loop counters.

    Valid wherever a checkpoint is saved: in ``on_train_batch_end`` (``ModelCheckpoint(every_n_train_steps)``,
    the batch counted as done), after a batch or in validation (a preemption, ``val_check_interval``), at the
    end of an epoch (the next epoch, 0 done) and after ``fit``.
    """
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    epoch = epochs.processed
    if epochs.started <= epochs.processed:  # between epochs: the next one starts from its first batch
        return epoch, 0
    done = fit_loop.epoch_loop.batch_progress.current.processed
    if done >= trainer.num_training_batches:  # saved after the epoch's last batch, before the epoch ended
        return epoch + 1, 0
    return epoch, done


def rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """The global RNG states of torch (and of ``device`` if it is a GPU), numpy and Python's ``random``."""
    version, mt, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (version, torch.from_numpy(mt.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device | None = None) -> None:
    """Restores what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    version, mt, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((version, mt.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
