"""CPC's patch grid (Oord et al. 2018, sec. 3.2; Henaff et al. 2020): every image cut into a grid of overlapping
square patches, by default with 50% overlap (stride = patch / 2).

The paper: a 7 x 7 grid of 64 px patches, stride 32, from 256 px images. Patch (i, j) of an image of side H is
``x[..., top + i * stride : top + i * stride + patch, left + j * stride : ... + patch]``, where ``top`` and ``left``
centre the grid when ``(H - patch) % stride`` leaves pixels over (split as evenly as possible, the extra pixel
at the bottom / right). CPC v2's per-patch augmentation (:func:`augment_patches`): a random horizontal flip and,
on colour input, "colour dropping" -- two of the three channels of each patch dropped at random.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.pretext.sampling import check_images, cpu_generator, randint
from ssl_lightning.registry import SSLError


def grid_layout(height: int, width: int, patch: int, stride: int | None = None) -> tuple[int, int, int, int]:
    """``(rows, columns, top, left)`` of the grid of ``patch`` px patches with ``stride`` (default ``patch // 2``)
    on an image of ``height`` x ``width``: how many fit and the offset that centres them."""
    stride = patch // 2 if stride is None else stride
    if patch < 1 or stride < 1:
        raise SSLError(f"patch grid: patch ({patch}) and stride ({stride}) must be positive pixel counts")
    if patch > min(height, width):
        raise SSLError(f"patch grid: {patch} px patches do not fit in {height}x{width} px images: use a smaller "
                       "patch or larger images (the paper: 64 px patches, stride 32, on 256 px images)")
    rows, cols = (height - patch) // stride + 1, (width - patch) // stride + 1
    return rows, cols, (height - patch - (rows - 1) * stride) // 2, (width - patch - (cols - 1) * stride) // 2


def patch_grid(x: Tensor, patch: int, stride: int | None = None) -> Tensor:
    """The patches of every image of ``x`` (B, C, H, W) as a view-free tensor (B, rows, columns, C, patch, patch),
    laid out by :func:`grid_layout` (the grid's row index first: CPC predicts down the rows)."""
    check_images(x, "patch_grid")
    stride = patch // 2 if stride is None else stride
    rows, cols, top, left = grid_layout(x.shape[2], x.shape[3], patch, stride)
    area = x[:, :, top:top + (rows - 1) * stride + patch, left:left + (cols - 1) * stride + patch]
    tiles = area.unfold(2, patch, stride).unfold(3, patch, stride)  # (B, C, rows, cols, patch, patch)
    return tiles.permute(0, 2, 3, 1, 4, 5).contiguous()


def augment_patches(patches: Tensor, generator: torch.Generator | None = None, flip: bool = True,
                    colour_drop: bool = True) -> Tensor:
    """CPC v2's patch-based augmentation on patches (n, C, p, p), each patch on its own: ``flip``: mirrored
    left-right with probability 1/2; ``colour_drop`` (3-channel input only): one random channel kept, the other two
    set to 0 (the dataset mean of normalised images). Random choices from ``generator`` (CPU)."""
    if patches.ndim != 4:
        raise SSLError(f"augment_patches expects patches (n, C, p, p), got {tuple(patches.shape)}: flatten the grid first")
    g = cpu_generator(generator)
    n, c = patches.shape[:2]
    dev = patches.device
    if flip:
        mirrored = (torch.rand(n, generator=g) < 0.5).to(dev)
        patches = torch.where(mirrored[:, None, None, None], patches.flip(-1), patches)
    if colour_drop and c == 3:
        keep = randint(c - 1, (n,), g).to(dev)
        kept = torch.arange(c, device=dev)[None] == keep[:, None]  # (n, C)
        patches = patches * kept[:, :, None, None].to(patches.dtype)
    return patches
