"""Batched augmentation: the views of :mod:`ssl_lightning.data.views` computed for a whole uint8 batch at
once on the training device (GPU when present), each sample and view with its own random parameters.

``BatchMultiView(views, mean, std)(images, generator)`` maps a uint8 batch ``(B, C, H, W)`` to the list of
normalised float views in :class:`~ssl_lightning.data.views.MultiViewTransform`'s order (``count`` views
per config, each at its config's ``size``: global then local crops). ``SSLDataModule(augment="device")``
calls it after the uint8 batch reached the device.

Same distributions as the per-image pipeline (:func:`~ssl_lightning.data.views.build_view`), checked in
tests/test_batch_views.py: torchvision's RandomResizedCrop (10 trials of area and log-aspect-ratio, first
valid one, else the centre crop), horizontal flip, ColorJitter applied with probability ``jitter`` (uniform
factors, a random order of the four ops per sample), grayscale, Gaussian blur (sigma ~ U(0.1, 2), kernel
~10% of the size) and solarisation. For fixed parameters each op equals torchvision's functional op on float
images. Deliberate differences from the per-image pipeline:

* everything runs in float32 on [0, 1]; the per-image pipeline rounds to uint8 after each op (<= 1/255 each);
* the crop is resized bilinearly *without* antialiasing (the per-image one antialiases): identical when the
  crop is enlarged -- always the case for views at the dataset's size -- and aliased when a crop larger
  than the output is shrunk (e.g. from images loaded larger than the view size);
* solarisation inverts values >= 0.5, which on uint8-valued inputs is the per-image threshold 128.

Randomness: parameters are drawn on the CPU from the ``torch.Generator`` passed in (the data module seeds
it per batch from its samples' ``(seed, epoch, index)`` seeds), so views are reproducible, independent of the
device and exact after a resume; and since the samples each op applies to are known on the host, the device
work needs no device-to-host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lightning.data.views import ViewConfig, _blur_kernel
from ssl_lightning.registry import SSLError

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop aspect-ratio range (build_view keeps it)
CROP_TRIALS = 10
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 0.5
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op ids (its fn_idx)


@dataclass
class ViewParams:
    """Random parameters of ``n`` views: crop box, flip, jitter (applied?, factors, op order), grayscale,
    blur (applied?, sigma), solarise. Factors are (brightness, contrast, saturation, hue)."""

    top: Tensor  # (n,) long
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor  # (n,) bool
    jitter: Tensor  # (n,) bool
    factors: Tensor  # (n, 4) float
    order: Tensor  # (n, 4) long, a permutation of 0..3 per sample
    gray: Tensor  # (n,) bool
    blur: Tensor  # (n,) bool
    sigma: Tensor  # (n,) float
    solarize: Tensor  # (n,) bool

    def slice(self, start: int, stop: int) -> ViewParams:
        return ViewParams(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


def jitter_ranges(cfg: ViewConfig) -> list[tuple[float, float] | None]:
    """ColorJitter's factor ranges: [max(0, 1 - s), 1 + s] for brightness / contrast / saturation and
    [-h, h] for hue; None for an op of strength 0 (ColorJitter skips it)."""
    ranges: list[tuple[float, float] | None] = []
    for name in ("brightness", "contrast", "saturation"):
        s = float(getattr(cfg, name))
        if s < 0:
            raise SSLError(f"ViewConfig.{name}={s} is negative: use a jitter strength >= 0")
        ranges.append((max(0.0, 1.0 - s), 1.0 + s) if s > 0 else None)
    if not 0 <= cfg.hue <= 0.5:
        raise SSLError(f"ViewConfig.hue={cfg.hue} is outside [0, 0.5]: use a hue jitter strength in [0, 0.5]")
    ranges.append((-float(cfg.hue), float(cfg.hue)) if cfg.hue > 0 else None)
    return ranges


def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> Tensor:
    return torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=g)


def sample_crops(n: int, height: int, width: int, scale: tuple[float, float], g: torch.Generator,
                 ratio: tuple[float, float] = RATIO) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's RandomResizedCrop.get_params for ``n`` samples at once: ``CROP_TRIALS`` candidates
    (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)) per sample, the first that fits, else the
    centre crop; returns (top, left, height, width) as long tensors."""
    area = height * width
    target = area * _uniform((n, CROP_TRIALS), scale[0], scale[1], g)
    aspect = torch.exp(_uniform((n, CROP_TRIALS), math.log(ratio[0]), math.log(ratio[1]), g))
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first candidate that fits
    found = fits.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height  # the centre-crop fallback
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, float(fw)).long()
    h = torch.where(found, h, float(fh)).long()
    u = torch.rand((n, 2), dtype=torch.float64, generator=g)  # randint(0, H - h + 1) = floor(u (H - h + 1))
    top = torch.minimum((u[:, 0] * (height - h + 1)).floor().long(), height - h)
    left = torch.minimum((u[:, 1] * (width - w + 1)).floor().long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def sample_view_params(cfg: ViewConfig, n: int, height: int, width: int, g: torch.Generator) -> ViewParams:
    """Independent parameters of ``n`` views of kind ``cfg`` from images of ``height`` x ``width``, on the CPU."""
    top, left, h, w = sample_crops(n, height, width, cfg.scale, g)
    bernoulli = lambda p: torch.rand(n, generator=g) < p  # noqa: E731  (torchvision: apply iff rand < p)
    flip = bernoulli(cfg.hflip)
    jitter = bernoulli(cfg.jitter)
    neutral = (1.0, 1.0, 1.0, 0.0)
    factors = torch.stack([_uniform((n,), *r, g) if r else torch.full((n,), neutral[k], dtype=torch.float64)
                           for k, r in enumerate(jitter_ranges(cfg))], dim=1)
    order = torch.rand((n, 4), generator=g).argsort(dim=1)  # a uniformly random permutation per sample
    gray = bernoulli(cfg.grayscale)
    blur = bernoulli(cfg.blur)
    sigma = _uniform((n,), *BLUR_SIGMA, g)
    solarize = bernoulli(cfg.solarize)
    return ViewParams(top, left, h, w, flip, jitter, factors, order, gray, blur, sigma, solarize)


# ---- the ops: float images (n, C, H, W) in [0, 1], per-sample parameters -----------------------------------
def resized_crop(images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, size: int) -> Tensor:
    """Each sample's box ``[top, top + height) x [left, left + width)`` resized to ``size`` x ``size`` in one
    ``grid_sample`` call: bilinear, pixel centres as ``F.interpolate(align_corners=False)`` places them,
    coordinates clamped to the box's edge pixels -- torchvision's resized_crop with antialias=False."""
    n, _, H, W = images.shape
    dev, dt = images.device, images.dtype
    o = (torch.arange(size, device=dev, dtype=dt) + 0.5) / size  # output pixel centres, fraction of the side
    box = torch.stack([top, left, height, width], dim=1).to(device=dev, dtype=dt, non_blocking=True)
    t, l, h, w = (box[:, k:k + 1] for k in range(4))
    x = l + (o * w - 0.5).clamp(min=0).minimum(w - 1)  # (n, size) source pixel coordinates
    y = t + (o * h - 0.5).clamp(min=0).minimum(h - 1)
    gx, gy = (2 * x + 1) / W - 1, (2 * y + 1) / H - 1  # grid_sample's normalised coordinates
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _col(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample values (n,) as (n, 1, 1, 1) in x's dtype and device."""
    return v.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _col(factor, x)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean grey level of the image (of the image itself for one channel)."""
    mean = (_gray(x) if x.shape[1] == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, _col(factor, x))


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grey image; a one-channel image is left as is (as torchvision and PIL do)."""
    return x if x.shape[1] == 1 else _blend(x, _gray(x), _col(factor, x))


def rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue (in turns, [0, 1)), saturation and value of RGB images (n, 3, H, W), each (n, 1, H, W)."""
    r, g, b = x.split(1, dim=1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)  # chroma
    flat = c == 0  # grey pixels: hue and saturation 0
    s = torch.where(flat, 0.0, c / torch.where(v == 0, 1.0, v))
    cc = torch.where(flat, 1.0, c)
    h = torch.where(v == r, (g - b) / cc, torch.where(v == g, 2 + (b - r) / cc, 4 + (r - g) / cc))
    h = torch.where(flat, 0.0, h)
    return torch.remainder(h / 6, 1.0), s, v


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Channel m of (r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n_m + 6 h) mod 6, n = (5, 3, 1)."""
    n = torch.arange(5, 0, -2, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)  # 5, 3, 1 (no host copy)
    k = torch.remainder(n + 6 * h, 6)
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue by ``factor`` turns in HSV space; a one-channel image is left as is."""
    if x.shape[1] == 1:
        return x
    h, s, v = rgb_to_hsv(x)
    return hsv_to_rgb(torch.remainder(h + _col(factor, x), 1.0), s, v)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed by op id


def _on(x: Tensor, mask: Tensor, op, *args: Tensor) -> Tensor:
    """``op`` applied, in place, to the samples of ``mask`` only (a CPU bool tensor: the subset is known
    without a device synchronisation); ``args`` are per-sample tensors."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return x.copy_(op(x, *args))
    args = tuple(a[idx] for a in args)
    idx = idx.to(x.device, non_blocking=True)
    return x.index_copy_(0, idx, op(x.index_select(0, idx), *args))


def color_jitter(x: Tensor, apply: Tensor, factors: Tensor, order: Tensor,
                 enabled: tuple[bool, ...] = (True, True, True, True)) -> Tensor:
    """ColorJitter with per-sample factors and op order: in round ``r`` every sample of ``apply`` gets the op
    ``order[:, r]`` (4 rounds x 4 ops, each on its own subset of samples). Ops not ``enabled`` are skipped."""
    x = x.clone()
    for r in range(4):
        for k, op in enumerate(JITTER_OPS):
            if enabled[k]:
                x = _on(x, apply & (order[:, r] == k), op, factors[:, k])
    return x


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma in every channel (the channel count is kept); one-channel images are already grey."""
    return x if x.shape[1] == 1 else _gray(x).expand_as(x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample Gaussian blur: a separable kernel exp(-d^2 / (2 sigma^2)) (normalised) of odd
    ``kernel_size`` for each sample, reflect padding, two grouped convolutions."""
    n, c, H, W = x.shape
    d = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    s = sigma.to(device=x.device, dtype=x.dtype, non_blocking=True)
    k = torch.exp(-(d[None] ** 2) / (2 * s[:, None] ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c, kernel_size)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)  # along the width
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)  # along the height
    return y.reshape(n, c, H, W)


def solarize(x: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    return torch.where(x >= threshold, 1 - x, x)


def _flip(x: Tensor) -> Tensor:
    return x.flip(-1)


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the samples of ``mask`` left-right."""
    return _on(x.clone(), mask, _flip)


def augment(images: Tensor, cfg: ViewConfig, p: ViewParams) -> Tensor:
    """Views of kind ``cfg`` (not normalised) of float ``images`` in [0, 1] for the parameters ``p`` (n = B
    or a multiple of it: sample ``i`` crops image ``i % B``), in build_view's order: crop, flip, jitter,
    grayscale, blur, solarise."""
    b, size = images.shape[0], int(cfg.size)
    n = p.top.shape[0]
    x = torch.cat([resized_crop(images, p.top[v:v + b], p.left[v:v + b], p.height[v:v + b], p.width[v:v + b], size)
                   for v in range(0, n, b)])
    x = _on(x, p.flip, _flip)  # x is ours (the crops): ops on subsets write in place
    if cfg.jitter > 0:
        enabled = tuple(r is not None for r in jitter_ranges(cfg))
        x = color_jitter(x, p.jitter, p.factors, p.order, enabled)
    if cfg.grayscale > 0:
        x = _on(x, p.gray, rgb_to_grayscale)
    if cfg.blur > 0:
        kernel = _blur_kernel(size)
        x = _on(x, p.blur, lambda y, sigma: gaussian_blur(y, sigma, kernel), p.sigma)
    if cfg.solarize > 0:
        x = _on(x, p.solarize, solarize)
    return x


class BatchMultiView:
    """``BatchMultiView(views, mean, std)(images, generator)``: the list of normalised float views of a uint8
    batch ``(B, C, H, W)`` on any device, ``count`` views per config, each at its config's ``size``."""

    def __init__(self, views: list[ViewConfig], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        for cfg in views:
            if cfg.size is None:
                raise SSLError("every ViewConfig needs a size here (the data module fills in the dataset's)")
            jitter_ranges(cfg)  # validates the strengths
        self.views, self.mean, self.std = list(views), tuple(mean), tuple(std)

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator) -> list[ViewParams]:
        """Parameters of every config's ``count x batch`` views (view-major), on the CPU."""
        return [sample_view_params(cfg, cfg.count * batch, height, width, generator) for cfg in self.views]

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise SSLError(f"BatchMultiView expects images (B, {len(self.mean)}, H, W), got {tuple(images.shape)}: "
                           "pass a batch with as many channels as the normalisation mean")
        if generator is None:  # seeded from torch's global RNG (seed_everything)
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        b, _, height, width = images.shape
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        views: list[Tensor] = []
        for cfg, params in zip(self.views, self.sample(b, height, width, generator)):
            if cfg.count == 0:  # e.g. multicrop with num_local_crops 0
                continue
            out = (augment(x, cfg, params) - mean) / std
            views += list(out.split(b))
        return views
