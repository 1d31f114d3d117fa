"""What the pretext builders share: their random numbers and their crops.

As in :mod:`ssl_lightning.data.batch_views`, random parameters (positions, labels, choices) are drawn on the
CPU from the ``torch.Generator`` passed in, so a builder's output is reproducible and independent of the
device; only full-size random fields (noise images) are drawn on the images' device, from a device
generator seeded from the CPU one (reproducible per device type).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.registry import SSLError


def cpu_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a CPU generator seeded from torch's global RNG (``seed_everything``) if None."""
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
    if generator.device.type != "cpu":
        raise SSLError(f"pretext builders draw their parameters from a CPU torch.Generator, got one on "
                       f"{generator.device}: pass torch.Generator() (the images may live on any device)")
    return generator


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from the CPU ``generator`` (for noise fields drawn where the images are)."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def randint(high: Tensor | int, shape: tuple[int, ...], generator: torch.Generator, low: Tensor | int = 0) -> Tensor:
    """Integers uniform in ``[low, high]`` (both included; per-element bounds allowed), long, on the CPU."""
    u = torch.rand(shape, dtype=torch.float64, generator=generator)
    low_t, high_t = torch.as_tensor(low), torch.as_tensor(high)
    return torch.minimum(low_t + (u * (high_t - low_t + 1)).floor().long(), high_t)


def check_images(x: Tensor, who: str) -> None:
    """A float batch (B, C, H, W), or a clear error."""
    if x.ndim != 4 or not x.is_floating_point():
        raise SSLError(f"{who} expects a float batch of images (B, C, H, W), got {x.dtype} {tuple(x.shape)}: convert "
                       "uint8 images with x.float() / 255")


def crop_patches(x: Tensor, image: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Square crops ``x[image[i], :, top[i]:top[i] + size, left[i]:left[i] + size]`` for every index ``i`` (any
    shape S of the index tensors, CPU or device), in one gather: shape (*S, C, size, size). The windows must
    lie inside the images."""
    dev = x.device
    image, top, left = (t.to(dev, non_blocking=True) for t in (image, top, left))
    offset = torch.arange(size, device=dev)
    rows = (top[..., None] + offset)[..., :, None]  # (*S, size, 1)
    cols = (left[..., None] + offset)[..., None, :]  # (*S, 1, size)
    patches = x.permute(0, 2, 3, 1)[image[..., None, None], rows, cols]  # (*S, size, size, C)
    return patches.movedim(-1, -3)
