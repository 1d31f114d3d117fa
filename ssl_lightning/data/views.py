"""One configurable multi-view / multi-crop augmentation: a list of :class:`ViewConfig`, one per view kind.

``MultiViewTransform(views)(image)`` returns a list of tensors, ``count`` views for each config in
order (e.g. 2 global then 6 local crops). Presets reproduce the papers' recipes for each image size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torchvision.transforms import v2

from ssl_lightning.registry import SSLError


@dataclass
class ViewConfig:
    """Augmentation of one kind of view (SimCLR / BYOL notation; probabilities in [0, 1])."""

    size: int | None = None  # output side in pixels; None = the dataset's image size
    count: int = 1  # how many views of this kind
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    hflip: float = 0.5
    jitter: float = 0.8  # probability of colour jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.0  # probability of Gaussian blur, sigma in [0.1, 2], kernel ~10% of the size
    solarize: float = 0.0


def view_preset(name: str, image_size: int, num_local: int = 6) -> list[ViewConfig]:
    """The papers' view recipes, adapted to the image size.

    * ``simclr``: two identical views; jitter strength 1.0 (0.8, 0.8, 0.8, 0.2) and blur p 0.5 at
      ImageNet scale, strength 0.5 (0.4, 0.4, 0.4, 0.1) and no blur for images of 32 px or less.
    * ``byol``: asymmetric views, blur 1.0 / 0.1 and solarize 0 / 0.2 (blur dropped at 32 px or less).
    * ``multicrop``: two global crops (scale 0.14-1) and ``num_local`` local crops (0.05-0.14) at 96/224
      of the global size (SwAV, DINO).
    """
    small = image_size <= 32
    if name == "simclr":
        s = 0.5 if small else 1.0
        view = ViewConfig(size=image_size, count=2, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s,
                          hue=0.2 * s, blur=0.0 if small else 0.5)
        return [view]
    if name == "byol":
        base = ViewConfig(size=image_size, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        return [replace(base, blur=0.0 if small else 1.0, solarize=0.0),
                replace(base, blur=0.0 if small else 0.1, solarize=0.2)]
    if name == "multicrop":
        local = max(8, round(image_size * 96 / 224))
        base = ViewConfig(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        return [replace(base, size=image_size, count=1, scale=(0.14, 1.0), blur=0.0 if small else 1.0),
                replace(base, size=image_size, count=1, scale=(0.14, 1.0), blur=0.0 if small else 0.1, solarize=0.2),
                replace(base, size=local, count=num_local, scale=(0.05, 0.14), blur=0.0 if small else 0.5)]
    raise SSLError(f"Unknown view preset {name!r}. Choose simclr, byol or multicrop, or give a list of views.")


def _blur_kernel(size: int) -> int:
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def build_view(cfg: ViewConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """The torchvision v2 pipeline of one view: crop, flip, jitter, grayscale, blur, solarize, normalise."""
    ops: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(cfg.size, scale=cfg.scale, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip),
    ]
    if cfg.jitter > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter))
    if cfg.grayscale > 0:
        ops.append(v2.RandomGrayscale(cfg.grayscale))
    if cfg.blur > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(cfg.size), sigma=(0.1, 2.0))], p=cfg.blur))
    if cfg.solarize > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=cfg.solarize))  # on uint8 images
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


class MultiViewTransform:
    """Maps one image (PIL or uint8 tensor) to the list of its views, in the order of ``views``."""

    def __init__(self, views: list[ViewConfig], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        for cfg in views:
            if cfg.size is None:
                raise ValueError("every ViewConfig needs a size here (the data module fills in the dataset's)")
        self.views = views
        self.pipelines = [build_view(cfg, mean, std) for cfg in views for _ in range(cfg.count)]

    def __call__(self, image) -> list[torch.Tensor]:
        return [pipeline(image) for pipeline in self.pipelines]


def eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], resize: bool) -> v2.Compose:
    """Un-augmented view for probes and kNN: (resize to size/0.875 and centre crop, if ``resize``), normalise."""
    ops: list = [v2.ToImage()]
    if resize:
        ops += [v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)
