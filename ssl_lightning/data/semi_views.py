"""Weak and strong augmentations of semi-supervised learning (FixMatch's notation), per image.

* weak: horizontal flip (p 0.5) and a translation: reflect-pad by ``translate`` x the side (4 px at 32, 12 at
  96) and crop back at a random position (fixmatch ``libml/augment.py``, ``augment_shift`` with REFLECT).
* strong: the weak ops, then RandAugment, then Cutout -- FixMatch's RandAugment variant (``ab_fixmatch_ra.py``
  with its default ``rac``: ``AugmentPoolRAMC``): ``num_ops`` 2 ops drawn with replacement from the 14 ops
  of RandAugment, each applied with probability 0.5 at a magnitude drawn uniformly from 1..9 on a 0..10
  scale (``np.random.randint(1, 10)``), then a gray square of side ``cutout`` x the side (16 px at 32,
  ``cutout_numpy``'s size 16) centred anywhere in the image and clipped at its border.

The ops are torchvision's ``v2.RandAugment`` (one op per call, 11 magnitude bins so that magnitude 10 is the
top of torchvision's ranges), so the op ranges are torchvision's (translate up to 150/331 of the side,
posterize down to 4 bits) rather than FixMatch's (10 px, down to 1 bit); the pixels that geometric ops
uncover are gray (127), as FixMatch's ``pil_unwrap`` leaves them. Images of varying size (image folders) are
first resized (shorter side) and centre-cropped to the training size. All randomness comes from torch's
RNG, which the data module seeds per sample, so views do not depend on the number of loader workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from ssl_lightning.registry import SSLError

GRAY = 127  # uint8 fill of Cutout and of the pixels uncovered by geometric ops
MAX_MAGNITUDE = 10  # FixMatch's scale (PARAMETER_MAX)


@dataclass
class WeakAugment:
    """Flip + translate."""

    hflip: float = 0.5  # probability of a horizontal flip
    translate: float = 0.125  # reflect-pad by this fraction of the side, then random-crop back


@dataclass
class StrongAugment:
    """RandAugment + Cutout, applied after the weak ops."""

    num_ops: int = 2
    magnitude: int = 10  # on a 0..10 scale; with random_magnitude, the exclusive upper bound of the draw
    random_magnitude: bool = True  # each op's magnitude ~ U{1, ..., magnitude - 1} (FixMatch); else fixed
    op_probability: float = 0.5  # each of the num_ops ops is applied with this probability
    cutout: float = 0.5  # side of the gray square, fraction of the image side (0: no cutout)


class Cutout(torch.nn.Module):
    """A gray square of side ``fraction x min(H, W)`` (rounded) centred at a uniformly random pixel, clipped at
    the border (so it may be smaller near an edge), on uint8 images ``(C, H, W)``."""

    def __init__(self, fraction: float = 0.5, fill: int = GRAY) -> None:
        super().__init__()
        self.fraction, self.fill = fraction, fill

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        side = int(round(self.fraction * min(h, w)))
        if side <= 0:
            return image
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        out = image.clone()
        out[..., max(0, cy - side // 2): min(h, cy + side - side // 2),
            max(0, cx - side // 2): min(w, cx + side - side // 2)] = self.fill
        return out


def check_augments(weak: WeakAugment, strong: StrongAugment | None = None) -> None:
    """Clear errors for impossible settings."""
    if not 0 <= weak.hflip <= 1 or not 0 <= weak.translate < 1:
        raise SSLError(f"WeakAugment(hflip={weak.hflip}, translate={weak.translate}): use hflip in [0, 1] and "
                       "translate in [0, 1) (a fraction of the image side; 0.125 = 4 px at 32 px)")
    if strong is None:
        return
    if strong.num_ops < 0 or not 0 <= strong.op_probability <= 1 or not 0 <= strong.cutout <= 1:
        raise SSLError(f"StrongAugment(num_ops={strong.num_ops}, op_probability={strong.op_probability}, "
                       f"cutout={strong.cutout}): use num_ops >= 0, op_probability in [0, 1] and cutout in [0, 1]")
    low = 2 if strong.random_magnitude else 0
    if not low <= strong.magnitude <= MAX_MAGNITUDE:
        raise SSLError(f"StrongAugment.magnitude={strong.magnitude}: use {low}..{MAX_MAGNITUDE} (a 0..10 scale"
                       + ("; with random_magnitude the magnitudes are drawn from 1..magnitude-1)" if low else ")"))


def _base_ops(size: int, weak: WeakAugment, resize: bool) -> list:
    ops: list = [v2.ToImage()]
    if resize:
        ops += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    ops.append(v2.RandomHorizontalFlip(weak.hflip))
    pad = int(round(weak.translate * size))
    if pad > 0:
        ops.append(v2.RandomCrop(size, padding=pad, padding_mode="reflect"))
    return ops


def _normalise(mean: tuple[float, ...], std: tuple[float, ...]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def weak_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], weak: WeakAugment | None = None,
                   resize: bool = False) -> v2.Compose:
    """Flip + translate, normalised: a float tensor ``(C, size, size)``."""
    weak = weak or WeakAugment()
    check_augments(weak)
    return v2.Compose(_base_ops(size, weak, resize) + _normalise(mean, std))


def rand_augment_op(strong: StrongAugment) -> v2.Transform:
    """One RandAugment op: uniform over the 14 ops, magnitude fixed or drawn from 1..magnitude-1."""
    bins = MAX_MAGNITUDE + 1
    if not strong.random_magnitude:
        return v2.RandAugment(num_ops=1, magnitude=strong.magnitude, num_magnitude_bins=bins, fill=GRAY)
    return v2.RandomChoice([v2.RandAugment(num_ops=1, magnitude=m, num_magnitude_bins=bins, fill=GRAY)
                            for m in range(1, strong.magnitude)])


def strong_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], weak: WeakAugment | None = None,
                     strong: StrongAugment | None = None, resize: bool = False) -> v2.Compose:
    """The weak ops, ``num_ops`` RandAugment ops (each with probability ``op_probability``), Cutout, normalised."""
    weak, strong = weak or WeakAugment(), strong or StrongAugment()
    check_augments(weak, strong)
    ops = _base_ops(size, weak, resize)
    for _ in range(strong.num_ops):
        op = rand_augment_op(strong)
        ops.append(op if strong.op_probability >= 1 else v2.RandomApply([op], p=strong.op_probability))
    if strong.cutout > 0:
        ops.append(Cutout(strong.cutout))
    return v2.Compose(ops + _normalise(mean, std))


class ViewList:
    """Maps one image to the list of its views, one per pipeline (picklable for loader workers)."""

    def __init__(self, pipelines: list) -> None:
        self.pipelines = list(pipelines)

    def __call__(self, image) -> list[torch.Tensor]:
        return [pipeline(image) for pipeline in self.pipelines]
