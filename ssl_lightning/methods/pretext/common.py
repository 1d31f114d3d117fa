"""What the pretext-task methods share: a per-step random generator for the input builders that a resumed
run reproduces, and the convention that the task's inputs get their own backbone pass.

The base class runs the backbone over the (un-transformed) first view as for every method: those features
feed the online probe and the kNN monitor, i.e. the evaluation sees whole images. The task's inputs
(rotations, tiles, patches) are built from that view on the device, in batch, and encoded in a second pass.
Tiles and patches are smaller and normalised on their own, so their pass (:func:`encode_pieces`) normalises
with its own batch statistics but leaves BatchNorm's running statistics to the whole images: those are what
the frozen-feature evaluations (kNN, ``ssl-lightning eval``) normalise with.

Jigsaw's and context prediction's towers end, as in both papers, with a per-piece layer shared by the pieces
(:class:`PieceTower`): the last feature map pooled to a small grid (the papers' pool5, 3 x 3 in the jigsaw repo)
and flattened, then fc6; only fc6's outputs are concatenated across the pieces. Without it the pieces' pooled
backbone features (the evaluated representation) must themselves encode where in the piece each pattern lies.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.backbones.feature_maps import forward_features
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.modules.batchnorm import frozen_bn_stats
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


def encode_pieces(backbone: nn.Module, pieces: torch.Tensor, who: str, fix: str, map_side: int = 0) -> torch.Tensor:
    """The backbone on tiles or patches (n, C, s, s), BatchNorm's running statistics kept for whole images
    (:func:`~ssl_lightning.modules.batchnorm.frozen_bn_stats`): the pooled ``backbone(pieces)`` (n, D) for ``map_side``
    0, else the last feature map average-pooled to ``map_side x map_side`` and flattened (n, D * map_side^2). A clear error when the pieces are
    too small for the backbone's downsampling (e.g. the small ConvNet's three 2x poolings need at least 8 px)."""
    try:
        with frozen_bn_stats(backbone):
            if map_side == 0:
                return backbone(pieces)
            return F.adaptive_avg_pool2d(forward_features(backbone, pieces), map_side).flatten(1)
    except RuntimeError as e:
        if "size" not in str(e).lower() or isinstance(e, torch.OutOfMemoryError):
            raise
        side = pieces.shape[-1]
        raise SSLError(f"{who}: the backbone cannot encode {side}x{side} px pieces ({str(e).splitlines()[0]}): {fix}") from e


class PieceTower(nn.Module):
    """The per-piece top of the siamese towers: :func:`encode_pieces` (pooled features, or the last map pooled to
    ``map_side x map_side`` and flattened), then a shared fc6 ``Linear -> BatchNorm -> ReLU`` of width ``fc6`` (0: no
    fc6, the encoder's output as it is). ``out_features``: the width of one piece's output.

    Args:
        backbone: the shared piece encoder (not owned: the method's backbone).
        who, fix: the method's name and the fix named by the too-small-pieces error.
    """

    def __init__(self, backbone: nn.Module, fc6: int, map_side: int, who: str, fix: str) -> None:
        super().__init__()
        if fc6 < 0 or map_side < 0:
            raise SSLError(f"{who}: fc6={fc6} and map_side={map_side} must be >= 0 (0: no fc6 / the pooled features)")
        if map_side and fc6 == 0:
            raise SSLError(f"{who}: map_side={map_side} flattens the feature map for fc6, but fc6=0: set fc6 > 0 "
                           "(the per-piece layer) or map_side: 0")
        self.map_side, self.who, self.fix = map_side, who, fix
        width = backbone.num_features * max(map_side, 1) ** 2
        self.fc6 = (nn.Sequential(nn.Linear(width, fc6), nn.BatchNorm1d(fc6), nn.ReLU(inplace=True)) if fc6
                    else nn.Identity())
        self.out_features = fc6 or width

    def forward(self, backbone: nn.Module, pieces: torch.Tensor) -> torch.Tensor:
        return self.fc6(encode_pieces(backbone, pieces, self.who, self.fix, self.map_side))
