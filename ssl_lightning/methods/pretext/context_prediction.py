"""Context prediction (Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
Prediction", ICCV 2015; cdoersch/deepcontext)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.heads import mlp
from ssl_lightning.methods.pretext.common import PieceTower, PretextMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.pretext.context import DOWNSAMPLE_FRACTION, MIN_PIXELS_SIDE, NUM_POSITIONS, patch_pairs


@METHODS.register("context_prediction")
class ContextPrediction(PretextMethod):
    """One patch and one of its 8 neighbours per image of the first view (:func:`~ssl_lightning.pretext.context.
    patch_pairs`: gap, jitter, random downsampling, chromatic-aberration guard on colour input only, per-patch
    normalisation); the shared (siamese) patch tower (the backbone on both patches in one pass, its last map
    pooled to ``map_side x map_side``, a shared fc6: the paper's towers end in pool5 -> fc6 per patch), the two
    fc6 outputs concatenated, an MLP head (fc7 ->): ``L = CE(head([g(p_1), g(p_2)]), position)``, chance
    ``ln 8 = 2.079``.

    Args:
        patch, gap, jitter: patch side, gap between grid cells and +-jitter in pixels (the paper: 96, 48, 7).
        downsample, min_size: the fraction of patches shrunk (to a side >= min_size) and enlarged back (1/3, 10).
        chromatic: on colour images keep one random channel per patch, noise in the others.
        patch_size: resize the patches to this side (bilinear) before the encoder; None = as cropped.
        fc6: width of the per-patch layer (the paper's 4096); 0 = none, the pooled backbone features are
            concatenated directly.
        map_side: the last feature map average-pooled to this side and flattened into fc6 (pool5); 0 = the
            pooled backbone features (any backbone; > 0 needs a ConvNet or ResNet's feature map).
        hidden: the head's hidden width (the paper's fc7: 4096); the head is ``2 fc6 -> hidden -> 8``.
        **kwargs: :class:`~ssl_lightning.methods.pretext.common.PretextMethod` options.
    """

    def __init__(self, patch: int = 96, gap: int = 48, jitter: int = 7, downsample: float = DOWNSAMPLE_FRACTION,
                 min_size: int = MIN_PIXELS_SIDE, chromatic: bool = True, patch_size: int | None = None,
                 fc6: int = 4096, map_side: int = 3, hidden: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tower = PieceTower(self.backbone, fc6, map_side, "ContextPrediction",
                                "set patch_size to upsample the patches, or use a larger patch")
        self.head = mlp([2 * self.tower.out_features, hidden, NUM_POSITIONS])

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        first, second, target = patch_pairs(views[0], hp.patch, hp.gap, hp.jitter, self.generator(),
                                            chromatic=hp.chromatic, downsample=hp.downsample, min_size=hp.min_size)
        pieces = torch.cat([first, second])
        if hp.patch_size is not None and hp.patch_size != pieces.shape[-1]:
            pieces = F.interpolate(pieces, size=hp.patch_size, mode="bilinear", align_corners=False)
        f1, f2 = self.tower(self.backbone, pieces).chunk(2)
        logits = self.head(torch.cat([f1, f2], dim=1))
        return {"loss": F.cross_entropy(logits, target), "accuracy": (logits.argmax(1) == target).float().mean()}
