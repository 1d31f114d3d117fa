"""Contrastive Predictive Coding for images (Oord, Li & Vinyals, "Representation Learning with Contrastive Predictive
Coding", 2018; CPC v2: Henaff et al., "Data-Efficient Image Recognition with Contrastive Predictive Coding", ICML 2020).
No official code; Lightning-Bolts' CPC is not a reference (one shared predictor for every offset)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.backbones.feature_maps import forward_features, pool, stage as backbone_stage
from ssl_lightning.losses.mutual_information.cpc import cpc_infonce
from ssl_lightning.methods.mutual_information.context_network import ContextNetwork
from ssl_lightning.methods.pretext.common import PretextMethod, encode_pieces
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules.batchnorm import frozen_bn_stats
from ssl_lightning.pretext.patch_grid import augment_patches, patch_grid
from ssl_lightning.registry import SSLError

# each direction as a reorientation of the (B, rows, cols, D) grid after which it points down the rows
DIRECTIONS = {"down": lambda z: z, "up": lambda z: z.flip(1),
              "right": lambda z: z.transpose(1, 2), "left": lambda z: z.transpose(1, 2).flip(1)}


@METHODS.register("cpc")
class CPC(PretextMethod):
    """Each image of the first view cut into a grid of overlapping patches (:func:`~ssl_lightning.pretext.patch_grid.
    patch_grid`), each patch encoded on its own by the backbone and mean-pooled, ``z[b, i, j]``; a row-masked
    PixelCNN-style context network gives ``c[b, i, j]`` from rows ``<= i``; one linear predictor ``W_k`` per offset
    k = 1..K predicts the patch k rows below, scored against every patch of the global batch
    (:func:`~ssl_lightning.losses.mutual_information.cpc.cpc_infonce`): ``L = mean_k InfoNCE(W_k c[i], z[i + k])``.

    CPC v2's LayerNorm (batch statistics let patches see each other) is the backbone's: build it with
    ``backbone_kwargs: {norm: layer}`` (ConvNet and ResNets). A BatchNorm backbone still works (CPC v1): the patches
    are normalised with their batch's statistics, the running statistics are left to the whole images that the
    kNN and probes see (:func:`~ssl_lightning.modules.batchnorm.frozen_bn_stats`).

    Args:
        patch, stride: patch side and step in pixels (the paper: 64 and 32 on 256 px images, a 7 x 7 grid);
            stride None = patch // 2 (50% overlap).
        steps: K, the offsets predicted (the paper: up to 5 rows of the 7 x 7 grid); needs rows > K.
        directions: where predictions point: ``["down"]`` (v1), CPC v2 adds others (``"up"``, ``"left"``,
            ``"right"``), each with its own context network and predictors; the loss is their mean.
        context_blocks, context_hidden: the context network's residual blocks and bottleneck width
            (None = half the embedding width).
        stage: the backbone stage whose mean-pooled map is the patch embedding (None = the last, i.e. the pooled
            ``forward`` that evaluations use; the paper's ResNet-v2-101 used its third stage, ``layer3``).
        flip, colour_drop: CPC v2's per-patch augmentation (colour dropping only on 3-channel input).
        patch_size: resize the patches to this side (bilinear) before the encoder; None = as cut.
        **kwargs: :class:`~ssl_lightning.methods.pretext.common.PretextMethod` options.
    """

    def __init__(self, patch: int = 64, stride: int | None = None, steps: int = 5, directions: list[str] | None = None,
                 context_blocks: int = 5, context_hidden: int | None = None, stage: str | None = None,
                 flip: bool = True, colour_drop: bool = True, patch_size: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hparams.directions = directions = list(directions or ["down"])
        unknown = sorted(set(directions) - set(DIRECTIONS))
        if unknown or len(set(directions)) != len(directions) or steps < 1:
            raise SSLError(f"CPC: directions must be distinct ones of {list(DIRECTIONS)} and steps >= 1, got "
                           f"directions={directions}, steps={steps}")
        dim = backbone_stage(self.backbone, stage).channels  # the clear error for backbones without feature maps
        self.context = nn.ModuleDict({d: ContextNetwork(dim, context_hidden or max(1, dim // 2), context_blocks)
                                      for d in directions})
        self.predictors = nn.ModuleDict({d: nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(steps))
                                         for d in directions})  # W_k, k = 1..K: the log-bilinear score z^T W_k c

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``z`` (B, rows, cols, D) of a batch of images."""
        hp = self.hparams
        grid = patch_grid(images, hp.patch, hp.stride)  # (B, rows, cols, C, p, p)
        pieces = augment_patches(grid.flatten(0, 2), self.generator(), flip=hp.flip, colour_drop=hp.colour_drop)
        if hp.patch_size is not None and hp.patch_size != pieces.shape[-1]:
            pieces = F.interpolate(pieces, size=hp.patch_size, mode="bilinear", align_corners=False)
        if hp.stage is None:
            z = encode_pieces(self.backbone, pieces, "CPC", "use larger patches, or set patch_size to upsample them")
        else:
            with frozen_bn_stats(self.backbone):
                z = pool(forward_features(self.backbone, pieces, hp.stage))
        return z.view(*grid.shape[:3], -1)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encode_patches(views[0])
        per_offset = []
        for name, orient in ((d, DIRECTIONS[d]) for d in self.hparams.directions):
            target = orient(z)  # (B, rows, cols, D), predictions down its rows
            context = self.context[name](target.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            predictions = torch.stack([w_k(context) for w_k in self.predictors[name]])  # (K, B, rows, cols, D)
            per_offset.append(cpc_infonce(predictions, target, per_offset=True))
        per_k = torch.stack(per_offset).mean(0)
        return {"loss": per_k.mean(), **{f"loss_k{k}": v.detach() for k, v in enumerate(per_k, start=1)}}
