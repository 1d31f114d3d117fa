"""Jigsaw puzzles (Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles",
ECCV 2016; bbrattoli/JigsawPuzzlePytorch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.heads import mlp
from ssl_lightning.methods.pretext.common import PieceTower, PretextMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.pretext.jigsaw import jigsaw_tiles, maximal_hamming_permutations


@METHODS.register("jigsaw")
class Jigsaw(PretextMethod):
    """Each image of the first view cut into a ``grid x grid`` puzzle of random tiles, each normalised on its own
    and shuffled by one of P permutations (:func:`~ssl_lightning.pretext.jigsaw.jigsaw_tiles`); the shared tile
    tower (the backbone on all B * grid^2 tiles in one pass, its last map pooled to ``map_side x map_side``, and a
    shared fc6: the repo's conv5 -> pool5 (3 x 3) -> fc6 (1024) per tile), the tiles' fc6 outputs concatenated
    in position order, an MLP head (fc7, fc8) and ``L = CE(head([g(t_1), ..., g(t_n)]), perm index)``, chance
    ``ln P``.

    Args:
        grid: tiles per side (the paper's 3: 9 tiles).
        num_perms: P, the permutation set's size (100 to 1000 in the paper; at most grid^2!).
        perm_seed: seed of the set's random first permutation (maximal mean Hamming distance,
            Algorithm 1). The set is a buffer, so checkpoints keep it.
        tile: tile side in pixels, cropped at a random position in its cell (default 64/75 of the cell,
            the paper's 64 px tile in a 75 px cell; the spare pixels are the gap against edge continuity).
        tile_size: resize tiles to this side (bilinear) before the encoder; None = as cropped. For small
            images whose tiles are too small for the encoder's pooling.
        per_channel: normalise each tile channel by channel (the paper) or over all channels (the repo).
        fc6: width of the per-tile layer (the repo's 1024); 0 = none, the tiles' pooled backbone features are
            concatenated directly.
        map_side: the last feature map average-pooled to this side and flattened into fc6 (the repo's 3 x 3
            pool5); 0 = the pooled backbone features (any backbone; > 0 needs a ConvNet or ResNet's feature map).
        hidden: the head's hidden width (the paper's fc7: 4096); the head is ``grid^2 * fc6 -> hidden -> P``.
        **kwargs: :class:`~ssl_lightning.methods.pretext.common.PretextMethod` options.
    """

    def __init__(self, grid: int = 3, num_perms: int = 100, perm_seed: int = 0, tile: int | None = None,
                 tile_size: int | None = None, per_channel: bool = True, fc6: int = 1024, map_side: int = 3,
                 hidden: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("permutations", maximal_hamming_permutations(grid * grid, num_perms, perm_seed))
        self.tower = PieceTower(self.backbone, fc6, map_side, "Jigsaw", "set tile_size to upsample the tiles (e.g. "
                                "16), or use a smaller grid or larger images")
        self.head = mlp([grid * grid * self.tower.out_features, hidden, num_perms])

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        tiles, target = jigsaw_tiles(views[0], self.permutations, hp.grid, hp.tile, self.generator(),
                                     per_channel=hp.per_channel)
        b, n = tiles.shape[:2]
        tiles = tiles.flatten(0, 1)
        if hp.tile_size is not None and hp.tile_size != tiles.shape[-1]:
            tiles = F.interpolate(tiles, size=hp.tile_size, mode="bilinear", align_corners=False)
        logits = self.head(self.tower(self.backbone, tiles).reshape(b, n * self.tower.out_features))
        return {"loss": F.cross_entropy(logits, target), "accuracy": (logits.argmax(1) == target).float().mean()}
