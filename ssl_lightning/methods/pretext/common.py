"""What the pretext-task methods share: a per-step random generator for the input builders that a resumed
run reproduces, and the convention that the task's inputs get their own backbone pass.

The base class runs the backbone over the (un-transformed) first view as for every method: those features
feed the online probe and the kNN monitor, i.e. the evaluation sees whole images. The task's inputs
(rotations, tiles, patches) are built from that view on the device, in batch, and encoded in a second pass.
"""
from __future__ import annotations

import hashlib

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


def encode_pieces(backbone: nn.Module, pieces: torch.Tensor, who: str, fix: str) -> torch.Tensor:
    """``backbone(pieces)`` for tiles or patches (n, C, s, s), with a clear error when they are too small for the
    backbone's downsampling (e.g. the small ConvNet's three 2x poolings need at least 8 px)."""
    try:
        return backbone(pieces)
    except RuntimeError as e:
        if "size" not in str(e).lower() or isinstance(e, torch.OutOfMemoryError):
            raise
        side = pieces.shape[-1]
        raise SSLError(f"{who}: the backbone cannot encode {side}x{side} px pieces ({str(e).splitlines()[0]}): {fix}") from e
