"""What the pretext-task methods share: a per-step random generator for the input builders that a resumed
run reproduces, and the convention that the task's inputs get their own backbone pass.

The base class runs the backbone over the (un-transformed) first view as for every method: those features
feed the online probe and the kNN monitor, i.e. the evaluation sees whole images. The task's inputs
(rotations, tiles, patches) are built from that view on the device, in batch, and encoded in a second pass.
Tiles and patches are smaller and normalised on their own, so their pass (:func:`encode_pieces`) normalises
with its own batch statistics but leaves BatchNorm's running statistics to the whole images: those are what
the frozen-feature evaluations (kNN, ``ssl-lightning eval``) normalise with.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from torch import nn

from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.pretext.sampling import cpu_generator
from ssl_lightning.registry import SSLError


class PretextMethod(SSLMethod):
    """:class:`SSLMethod` with :meth:`generator` for the pretext builders (``ssl_lightning.pretext``).

    Args:
        seed: mixed with the process rank and the number of training batches seen so far into each step's
            generator, so the tiles / patches / labels are reproducible and restored with the loops on resume.
        **kwargs: :class:`SSLMethod` options.
    """

    def __init__(self, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)

    def generator(self) -> torch.Generator:
        """The CPU generator of this training batch. Outside a trainer (tests, notebooks): one seeded from
        torch's global RNG, as the builders do when given None."""
        trainer = self._trainer
        if trainer is None:
            return cpu_generator(None)
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.ready  # loop state: saved in checkpoints
        key = f"{self.hparams.seed}:{trainer.global_rank}:{batches}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator().manual_seed(seed)


@contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Inside: BatchNorm layers of ``module`` in training mode normalise with the batch's statistics as usual, but
    update throw-away copies of their running statistics (mean, var, batch count); the originals are put back
    unchanged (swapped, not copied back: autograd holds the copies the forward pass updated in place)."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    saved = [{n: getattr(m, n) for n in names} for m in norms]
    for m, buffers in zip(norms, saved):
        for n, t in buffers.items():
            setattr(m, n, t.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved):
            for n, t in buffers.items():
                setattr(m, n, t)


def encode_pieces(backbone: nn.Module, pieces: torch.Tensor, who: str, fix: str) -> torch.Tensor:
    """``backbone(pieces)`` for tiles or patches (n, C, s, s), BatchNorm's running statistics kept for whole images
    (:func:`running_stats_kept`), with a clear error when the pieces are too small for the backbone's
    downsampling (e.g. the small ConvNet's three 2x poolings need at least 8 px)."""
    try:
        with running_stats_kept(backbone):
            return backbone(pieces)
    except RuntimeError as e:
        if "size" not in str(e).lower() or isinstance(e, torch.OutOfMemoryError):
            raise
        side = pieces.shape[-1]
        raise SSLError(f"{who}: the backbone cannot encode {side}x{side} px pieces ({str(e).splitlines()[0]}): {fix}") from e
