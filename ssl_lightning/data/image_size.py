"""The crop size of an image folder, taken from its images; and a warning when crops upsample them.

Rule (``derive_image_size``): the largest of :data:`COMMON_SIZES` (8 ... 224 px) that is not larger than
the median shorter side of a seeded sample of up to :data:`SAMPLE_SIZE` images (only their headers are
read: ``Image.open(p).size`` decodes no pixels). Crops then never upsample a typical image; images whose
shorter side is 224 px or more get 224 px crops, the ImageNet recipe; images smaller than 8 px get 8.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from ssl_lightning.data.folder import ArrayDataset, ImageFolderDataset
from ssl_lightning.registry import SSLError

COMMON_SIZES = (8, 16, 24, 28, 32, 48, 64, 96, 128, 160, 192, 224)
SAMPLE_SIZE = 256
MAX_UPSAMPLING = 2.0  # crops larger than this times the images' shorter side are warned about


@dataclass(frozen=True)
class ImageSides:
    """The median shorter side (px) of ``count`` images: a sample of a folder, or all of an array."""

    median: float
    count: int
    sampled: bool

    def describe(self) -> str:
        what = f"{self.count} sampled images" if self.sampled else f"{self.count} images"
        return f"median shorter side {self.median:g} px of {what}"


def image_sides(ds: Dataset, sample: int = SAMPLE_SIZE, seed: int = 0) -> ImageSides | None:
    """Shorter sides of a dataset's images: headers of a seeded sample of a folder's files, or the shape of
    in-memory arrays; None for other datasets. Unreadable headers are left out of the sample."""
    if isinstance(ds, ArrayDataset):
        return ImageSides(float(min(ds.images.shape[-2:])), len(ds), sampled=False)
    if not isinstance(ds, ImageFolderDataset):
        return None
    n = len(ds.samples)
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample].tolist()
    sides = []
    for i in sorted(picks):
        try:
            with Image.open(ds.samples[i][0]) as img:
                sides.append(min(img.size))
        except Exception:  # noqa: BLE001 -- a bad file is check-data's and the loader's business, not the sample's
            continue
    if not sides:
        raise SSLError(f"None of the {len(picks)} sampled images of {ds.root} can be opened, so their size is unknown: "
                       "run `ssl-lightning check-data` with the same data settings to list the unreadable files, "
                       "or set data.image_size")
    return ImageSides(float(statistics.median(sides)), len(sides), sampled=len(picks) < n)


def size_for(shorter_side: float) -> int:
    """The largest common crop size not larger than ``shorter_side`` (8 for tinier images)."""
    return max([s for s in COMMON_SIZES if s <= shorter_side], default=COMMON_SIZES[0])


def upsampling_warning(crop: int, sides: ImageSides | None) -> str | None:
    """A warning when ``crop`` px crops are more than :data:`MAX_UPSAMPLING` x the images' shorter side."""
    if sides is None or sides.median <= 0 or crop <= MAX_UPSAMPLING * sides.median:
        return None
    return (f"[ssl_lightning] {crop} px crops upsample the images {crop / sides.median:.1f}x ({sides.describe()}): "
            "this costs compute and memory and adds no detail; set data.image_size (and the views' sizes) to about "
            f"{size_for(sides.median)}")
