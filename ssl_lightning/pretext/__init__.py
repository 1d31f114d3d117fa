"""Pretext-task inputs built in batch on the training device: pure functions from a batch of images (B, C, H, W)
to a task's inputs and targets, any device, an optional CPU ``torch.Generator`` for reproducibility.

* :mod:`~ssl_lightning.pretext.rotation` -- the 4 rotations of each image (RotNet);
* :mod:`~ssl_lightning.pretext.jigsaw` -- maximal-Hamming permutation sets and shuffled tiles (Noroozi & Favaro);
* :mod:`~ssl_lightning.pretext.context` -- patch pairs and their relative position (Doersch et al.);
* :mod:`~ssl_lightning.pretext.color` -- Lab, in-gamut ab bins, soft targets, rebalancing (Zhang et al.);
* :mod:`~ssl_lightning.pretext.masks` -- context-encoder masks with mean fill, masking noise (Pathak; Vincent).
* :mod:`~ssl_lightning.pretext.patch_grid` -- CPC's grid of overlapping patches, its per-patch augmentation (Oord; Henaff).
"""
from ssl_lightning.pretext.color import (ab_gamut_bins, bin_counts, lab_inputs, lab_to_rgb, non_gray_mask, normalize_l,
                                         quantize_ab, rebalance_weights, rgb_to_lab, soft_encode)
from ssl_lightning.pretext.color import ToNetworkInput, annealed_mean, network_input, quantize_l
from ssl_lightning.pretext.context import NEIGHBOUR_OFFSETS, downsample_upsample, patch_pairs, sample_pair_positions
from ssl_lightning.pretext.jigsaw import (all_permutations, greedy_hamming, jigsaw_tiles, maximal_hamming_permutations,
                                          mean_hamming_distance, permute_tiles, unpermute_tiles)
from ssl_lightning.pretext.masks import central_mask, fill_with_mean, masking_noise, random_region_mask
from ssl_lightning.pretext.patch_grid import augment_patches, grid_layout, patch_grid
from ssl_lightning.pretext.rotation import rotate_batch, unrotate_batch

__all__ = [
    "NEIGHBOUR_OFFSETS",
    "ToNetworkInput",
    "ab_gamut_bins",
    "all_permutations",
    "annealed_mean",
    "bin_counts",
    "central_mask",
    "downsample_upsample",
    "fill_with_mean",
    "greedy_hamming",
    "jigsaw_tiles",
    "lab_inputs",
    "lab_to_rgb",
    "masking_noise",
    "maximal_hamming_permutations",
    "mean_hamming_distance",
    "network_input",
    "non_gray_mask",
    "normalize_l",
    "patch_pairs",
    "permute_tiles",
    "quantize_l",
    "quantize_ab",
    "random_region_mask",
    "rebalance_weights",
    "rgb_to_lab",
    "rotate_batch",
    "sample_pair_positions",
    "soft_encode",
    "unpermute_tiles",
    "unrotate_batch",
]
__all__ += ["augment_patches", "grid_layout", "patch_grid"]
