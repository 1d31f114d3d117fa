"""Rotation prediction (Gidaris, Singh & Komodakis, ICLR 2018; gidariss/FeatureLearningRotNet): each image
rotated by 0, 90, 180 and 270 degrees, all four in the same batch, and a 4-way classification of the angle."""
from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.pretext.sampling import check_images
from ssl_lightning.registry import SSLError

NUM_ROTATIONS = 4


def rotate_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """The 4 rotations of each image of ``x`` (B, C, H, W), image-major as in RotNet's loader: ``x4[4 b + k]`` is
    image b rotated by ``k * 90`` degrees counter-clockwise (``torch.rot90`` on the (H, W) plane), ``labels[4 b
    + k] = k``. Returns ``x4`` (4 B, C, H, W) and ``labels`` (4 B,) long, on x's device."""
    check_images(x, "rotate_batch")
    if x.shape[-1] != x.shape[-2]:
        raise SSLError(f"rotate_batch needs square images to stack their rotations, got {tuple(x.shape[-2:])}: "
                       "crop the images to a square first")
    x4 = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)], dim=1)
    labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat(x.shape[0])
    return x4.flatten(0, 1), labels


def unrotate_batch(x4: Tensor, labels: Tensor) -> Tensor:
    """The inverse: each sample of ``x4`` rotated back by ``-labels[i] * 90`` degrees (any order of samples)."""
    out = torch.empty_like(x4)
    for k in range(NUM_ROTATIONS):
        idx = (labels == k).nonzero().squeeze(1)
        out[idx] = torch.rot90(x4[idx], -k, dims=(-2, -1))
    return out
