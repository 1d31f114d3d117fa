"""Masks and corruptions for reconstruction tasks: the context encoder's central and random-region masks
(Pathak et al., CVPR 2016; pathak22/context-encoder ``train.lua``, ``train_random.lua``), filled with the
dataset mean, and the denoising autoencoder's masking noise (Vincent et al., ICML 2008)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.pretext.sampling import check_images, cpu_generator, device_generator, randint
from ssl_lightning.registry import SSLError

# train_random.lua: low-resolution uniform noise (res 0.06 of the pattern's side) upsampled bicubically and
# thresholded at density 0.25; a window is accepted when 20% < area < 30%. At its 128 px input a window
# spans 0.06 * 128 = 7.68 noise cells, kept here at any image size.
NOISE_CELLS = 0.06 * 128
DENSITY = 0.25
COVERAGE = (0.2, 0.3)
CANDIDATES = 32  # windows tried at once


def central_mask(size: int, hole: int, device: torch.device | str | None = None) -> Tensor:
    """(size, size) bool, True on the centred ``hole x hole`` square (the context encoder: 128 px input, 64 px
    hole); it covers ``hole^2 / size^2`` of the image. Off-centre by half a pixel when ``size - hole`` is odd."""
    if not 0 < hole <= size:
        raise SSLError(f"central_mask: hole={hole} must be in 1..size={size}: use a hole no larger than the image")
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    start = (size - hole) // 2
    mask[start:start + hole, start:start + hole] = True
    return mask


def random_region_mask(size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
                       coverage: tuple[float, float] = COVERAGE, density: float = DENSITY,
                       noise_cells: float = NOISE_CELLS, max_tries: int = 1024) -> Tensor:
    """(size, size) bool: the context encoder's random region, one mask for a whole batch. Uniform noise on a
    coarse grid (``noise_cells`` cells per image side) is upsampled bicubically, a random ``size x size``
    window is thresholded at ``density`` (True below it), and the first window whose masked fraction is
    strictly inside ``coverage`` is kept (``train_random.lua`` takes windows of one large pattern until
    20% < area < 30%)."""
    lo, hi = coverage
    if not 0 <= lo < hi <= 1:
        raise SSLError(f"random_region_mask: coverage={coverage} must satisfy 0 <= low < high <= 1")
    g = cpu_generator(generator)
    scale = size / noise_cells  # pixels per noise cell
    cells = math.ceil(noise_cells) + 4  # margin for the window's random offset and the bicubic border
    side = math.ceil(cells * scale)
    for _ in range(max(1, max_tries // CANDIDATES)):
        noise = torch.rand(CANDIDATES, 1, cells, cells, generator=g)
        pattern = F.interpolate(noise, size=(side, side), mode="bicubic", align_corners=False)[:, 0]
        margin = side - size - 2 * math.ceil(scale)  # windows keep a cell away from the border
        top = math.ceil(scale) + randint(margin, (CANDIDATES,), g)
        left = math.ceil(scale) + randint(margin, (CANDIDATES,), g)
        rows = (top[:, None] + torch.arange(size))[:, :, None]
        cols = (left[:, None] + torch.arange(size))[:, None, :]
        windows = pattern[torch.arange(CANDIDATES)[:, None, None], rows, cols] < density
        fraction = windows.float().mean(dim=(1, 2))
        ok = ((fraction > lo) & (fraction < hi)).nonzero()
        if ok.numel():
            return windows[int(ok[0])].to(device)
    raise SSLError(f"random_region_mask found no {size}x{size} mask covering {lo:.0%}-{hi:.0%} in {max_tries} tries: "
                   f"widen coverage or move density={density} towards its middle")


def fill_with_mean(x: Tensor, mask: Tensor, mean: Sequence[float] | Tensor) -> Tensor:
    """``x`` (B, C, H, W) with the pixels of ``mask`` ((H, W), (B, H, W) or (B, 1, H, W) bool) set to the per-channel
    ``mean`` (C values: the dataset mean, in x's units), the rest unchanged; a new tensor."""
    check_images(x, "fill_with_mean")
    if mask.dtype != torch.bool or mask.shape[-2:] != x.shape[-2:]:
        raise SSLError(f"fill_with_mean expects a bool mask of the images' size {tuple(x.shape[-2:])}, got "
                       f"{mask.dtype} {tuple(mask.shape)}: build it with central_mask or random_region_mask")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(-1)
    if m.numel() != x.shape[1]:
        raise SSLError(f"fill_with_mean: {m.numel()} mean values for {x.shape[1]} channels: pass one mean per channel")
    mask = mask.to(x.device)
    if mask.ndim == 3:
        mask = mask[:, None]
    return torch.where(mask, m.view(1, -1, 1, 1), x)


def masking_noise(x: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """The denoising autoencoder's masking noise: in each sample a fixed number ``round(fraction * d)`` of its d
    input components, chosen at random, is forced to 0 (Vincent et al. 2008, sec. 2.3), the others kept.
    A new choice at every call; the random field is drawn on x's device (from a generator seeded from the
    CPU ``generator``). Returns a new tensor."""
    if not 0 <= fraction <= 1:
        raise SSLError(f"masking_noise: fraction={fraction} must be in [0, 1] (the share of inputs zeroed)")
    b = x.shape[0]
    flat = x.reshape(b, -1)
    k = round(fraction * flat.shape[1])
    d = flat.shape[1]
    scores = torch.rand(flat.shape, generator=device_generator(cpu_generator(generator), x.device), device=x.device)
    # the k highest scores are zeroed (a uniformly random k-subset); pick the smaller side of the split
    few = min(k, d - k)
    picked = torch.zeros(flat.shape, dtype=torch.bool, device=x.device)
    picked.scatter_(1, scores.topk(few, dim=1, largest=k <= d - k, sorted=False).indices, True)
    zeroed = picked if k <= d - k else ~picked
    return flat.masked_fill(zeroed, 0).reshape(x.shape)
