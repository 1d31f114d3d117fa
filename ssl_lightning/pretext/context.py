"""Context prediction (Doersch, Gupta & Efros, ICCV 2015; cdoersch/deepcontext ``train.py``): a patch and one of
its 8 neighbours on a grid of patches separated by a gap, both jittered, and an 8-way classification of
where the neighbour lies.

Labels (the code's ``pos2lbl``, 0-based) are the neighbour's position relative to the first patch::

    0 1 2
    3 . 4
    5 6 7

Against trivial shortcuts, per patch and in the code's order: a third of the patches are downsampled (to
as little as 10 x 10 pixels) and upsampled back; colour patches keep one random channel and get noise in
the other two (chromatic aberration); each patch is normalised (mean-free channels, unit RMS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.pretext.sampling import check_images, cpu_generator, crop_patches, device_generator, randint
from ssl_lightning.registry import SSLError

# (row, column) step of each label's neighbour, in grid cells
NEIGHBOUR_OFFSETS = torch.tensor([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])
NUM_POSITIONS = 8
DOWNSAMPLE_FRACTION = 0.33  # the code's random.random() < .33
MIN_PIXELS_SIDE = 10  # downsampled to as little as 10 x 10 (100 pixels)
NOISE_SCALE = 1 / 255  # the code's uniform(0, 1) - .5 noise on 0..255 images, for images in [0, 1]


def sample_pair_positions(b: int, height: int, width: int, patch: int, gap: int, jitter: int,
                          generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-left corners of ``b`` patch pairs and their labels, on the CPU: the second patch lies one grid step
    ``patch + gap`` from the first in the label's direction, each patch jittered by up to ``+-jitter`` pixels
    per axis, and the pair placed uniformly among the positions where both fit in the image.
    Returns ``(top1, left1, top2, left2, labels)``, each (b,) long."""
    step = patch + gap
    need = 2 * patch + gap + 2 * jitter
    if min(height, width) < need:
        raise SSLError(f"patch pairs of patch={patch}, gap={gap}, jitter={jitter} need images of at least "
                       f"{need}x{need} px, got {height}x{width}: use a smaller patch, gap or jitter, or larger images")
    labels = randint(NUM_POSITIONS - 1, (b,), generator)
    direction = NEIGHBOUR_OFFSETS[labels]  # (b, 2)
    j1 = randint(2 * jitter, (b, 2), generator) - jitter
    j2 = randint(2 * jitter, (b, 2), generator) - jitter
    corners = []
    for axis, size in ((0, height), (1, width)):
        off = direction[:, axis] * step
        low = torch.maximum(-j1[:, axis], -off - j2[:, axis])  # the grid's origin keeps both patches inside
        high = torch.minimum(size - patch - j1[:, axis], size - patch - off - j2[:, axis])
        origin = randint(high, (b,), generator, low=low)
        corners.append((origin + j1[:, axis], origin + off + j2[:, axis]))
    (top1, top2), (left1, left2) = corners
    return top1, left1, top2, left2, labels


def downsample_upsample(x: Tensor, sizes: Tensor) -> Tensor:
    """Each patch of ``x`` (n, C, p, p) resized bilinearly (no antialiasing) to ``sizes[i]`` x ``sizes[i]`` and back
    to p x p -- ``F.interpolate`` twice, for a different size per patch in one batch: each output pixel blends
    the 4 low-resolution pixels around it, each a bilinear sample of the patch (4 ``grid_sample`` calls)."""
    n, _, p, _ = x.shape
    dev, dt = x.device, x.dtype
    s = sizes.to(device=dev, dtype=dt, non_blocking=True)[:, None]  # (n, 1)
    out_px = torch.arange(p, device=dev, dtype=dt)[None]  # (1, p)
    v = ((out_px + 0.5) * s / p - 0.5).clamp(min=0)  # up: output pixel -> low-res coordinate (align_corners=False)
    u0 = v.floor().minimum(s - 1)
    u1 = (u0 + 1).minimum(s - 1)
    w1 = v - u0
    src = lambda u: (u + 0.5) * p / s - 0.5  # noqa: E731  (down: low-res pixel -> patch coordinate)
    norm = lambda c: (2 * c + 1) / p - 1  # noqa: E731  (grid_sample's coordinates)
    out = torch.zeros_like(x)
    for uy, wy in ((u0, 1 - w1), (u1, w1)):
        for ux, wx in ((u0, 1 - w1), (u1, w1)):
            gy, gx = norm(src(uy)), norm(src(ux))  # (n, p) each
            grid = torch.stack([gx[:, None, :].expand(n, p, p), gy[:, :, None].expand(n, p, p)], dim=-1)
            sample = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            out += (wy[:, None, :, None] * wx[:, None, None, :]) * sample
    return out


def drop_colours(x: Tensor, keep: Tensor, noise: Tensor) -> Tensor:
    """Keep channel ``keep[i]`` of patch i and replace the others with ``noise`` (same shape as x): the guard
    against chromatic aberration."""
    mask = torch.arange(x.shape[1], device=x.device)[None] == keep.to(x.device, non_blocking=True)[:, None]
    return torch.where(mask[:, :, None, None], x, noise)


def normalize_patches(x: Tensor) -> Tensor:
    """Per patch: subtract each channel's mean, then scale the whole patch to unit RMS (the code's
    ``im / sqrt(mean(im^2))``, without its x50 AlexNet input scale). A constant patch stays 0."""
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    rms = x.pow(2).mean(dim=(-3, -2, -1), keepdim=True).sqrt()
    return x / torch.where(rms > 0, rms, torch.ones_like(rms))


def patch_pairs(x: Tensor, patch: int, gap: int, jitter: int, generator: torch.Generator | None = None,
                chromatic: bool = True, downsample: float = DOWNSAMPLE_FRACTION, min_size: int = MIN_PIXELS_SIDE,
                noise_scale: float = NOISE_SCALE, normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """One patch pair per image of ``x`` (B, C, H, W) (the paper: 96 px patches, gap 48, jitter 7): returns the
    first patches (B, C, patch, patch), the second (neighbour) patches and the labels (B,) long, the
    neighbour's position (module docstring). ``downsample``: the fraction of patches shrunk to a random side
    in ``[min_size, patch - 1]`` (uniform in area, as the code) and enlarged back; ``chromatic``: for colour
    input, keep one random channel per patch and fill the others with uniform noise of width
    ``noise_scale`` (the code's +-0.5 grey levels for images in [0, 1]); ``normalize``: per-patch
    normalisation. Random choices come from ``generator`` (CPU); the noise is drawn on x's device."""
    check_images(x, "patch_pairs")
    b, c, h, w = x.shape
    g = cpu_generator(generator)
    top1, left1, top2, left2, labels = sample_pair_positions(b, h, w, patch, gap, jitter, g)
    image = torch.arange(b)
    pairs = torch.cat([crop_patches(x, image, top1, left1, patch), crop_patches(x, image, top2, left2, patch)])
    n = 2 * b  # first patches, then second patches: each gets its own random treatment
    if downsample > 0:
        small = min(min_size, patch - 1)
        chosen = torch.rand(n, generator=g) < downsample
        area = torch.rand(n, dtype=torch.float64, generator=g) * ((patch - 1) ** 2 - small ** 2) + small ** 2
        sizes = area.sqrt().floor().long()
        idx = chosen.nonzero().squeeze(1)
        if idx.numel():
            dev_idx = idx.to(x.device)
            pairs = pairs.index_copy(0, dev_idx, downsample_upsample(pairs.index_select(0, dev_idx), sizes[idx]))
    if chromatic and c == 3:
        keep = randint(c - 1, (n,), g)
        noise = torch.rand(pairs.shape, generator=device_generator(g, x.device), device=x.device, dtype=x.dtype)
        pairs = drop_colours(pairs, keep, (noise - 0.5) * noise_scale)
    if normalize:
        pairs = normalize_patches(pairs)
    first, second = pairs.split(b)
    return first, second, labels.to(x.device)

