"""The dataset registry: every dataset name the package knows, in this one file.

Each entry loads a split -- ``train`` (labelled: pretraining, probes and kNN), ``val``, and for
datasets with extra unlabelled images a separate pretraining split (``pretrain_split``, label -1 for
the unlabelled ones) -- from local files under ``root``, downloading through torchvision only when
``download`` is true.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from ssl_lightning.data.folder import ArrayDataset, ImageFolderDataset, read_class_list
from ssl_lightning.registry import Registry, SSLError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_DEB = "/usr/share/datasets/fashion-mnist"
IMAGENET100_CLASSES = Path(__file__).with_name("imagenet100_classes.txt")


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[..., Dataset]  # load(root, split, download, **options)
    num_classes: int
    channels: int
    image_size: int | None  # default crop size; None = from the images (ssl_lightning.data.image_size)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_eval: bool = False  # images of varying size: resize + centre crop for evaluation
    default_root: str = "data"
    pretrain_split: str = "train"  # STL-10: "pretrain" = train + unlabeled


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _array(images: np.ndarray, labels, channels_last: bool, classes=None) -> ArrayDataset:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(x, torch.as_tensor(np.asarray(labels), dtype=torch.long), classes)


# --- Fashion-MNIST: the idx files, gzipped (Debian's dataset-fashion-mnist) or not (torchvision) ----
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(root: str, split: str, download: bool = False) -> ArrayDataset:
    prefix = "t10k" if split == "val" else "train"
    if download:
        tvd.FashionMNIST(root, train=prefix == "train", download=True)
    img_path, lbl_path = _find_idx(Path(root), f"{prefix}-images-idx3-ubyte"), _find_idx(Path(root), f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise SSLError(
            f"Fashion-MNIST not found under {root!r} (looked for {prefix}-images-idx3-ubyte[.gz] there and in "
            f"FashionMNIST/raw/). Install it with `apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_DEB}), or set data.download=true."
        )
    return _array(_read_idx(img_path), _read_idx(lbl_path), channels_last=False, classes=tvd.FashionMNIST.classes)


# --- CIFAR and STL-10: torchvision's readers; without download, only file presence is checked -----
def _present(cls):
    """torchvision dataset class whose integrity check (md5 of every file) becomes a presence check,
    so local copies and small stand-ins in the same format load; downloads still verify md5."""

    class Local(cls):
        if isinstance(getattr(cls, "meta", None), dict):  # CIFAR also md5-checks its meta file when loading
            meta = {**cls.meta, "md5": None}  # check_integrity(path, None) = presence check

        def _check_integrity(self) -> bool:
            files = [name for name, _ in self.train_list + self.test_list]
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in files)

    Local.__name__ = cls.__name__
    return Local


def _torchvision(cls, root: str, download: bool, hint: str, **kwargs):
    try:
        return _present(cls)(root, download=download, **kwargs)
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise
        raise SSLError(f"{cls.__name__} not found under {root!r} (expected {hint}). Put the dataset there, "
                       "or set data.download=true to fetch it.") from None


def load_cifar(cls, folder: str):
    def load(root: str, split: str, download: bool = False) -> ArrayDataset:
        ds = _torchvision(cls, root, download, f"{root}/{folder}", train=split != "val")
        return _array(ds.data, ds.targets, channels_last=True, classes=ds.classes)
    return load


def load_stl10(root: str, split: str, download: bool = False) -> ArrayDataset:
    tv_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
    ds = _torchvision(tvd.STL10, root, download, f"{root}/stl10_binary/*.bin", split=tv_split)
    return _array(ds.data, ds.labels, channels_last=False, classes=getattr(ds, "classes", None))


# --- Image folders ------------------------------------------------------------------------------------
def load_image_folder(root: str, split: str, download: bool = False, class_list: str | None = None) -> Dataset | None:
    """``root/train`` and ``root/val`` if they exist (ImageNet layout), else ``root`` itself for training."""
    if download:
        raise SSLError("Image-folder datasets cannot be downloaded: set data.download=false and data.root to the folder")
    base = Path(root)
    has_splits = (base / "train").is_dir()
    if split == "val":
        if not (base / "val").is_dir():
            return None
        folder = base / "val"
    else:
        folder = base / "train" if has_splits else base
    classes = read_class_list(class_list) if class_list else None
    return ImageFolderDataset(folder, classes)


def load_imagenet100(root: str, split: str, download: bool = False, class_list: str | None = None):
    return load_image_folder(root, split, download, class_list or str(IMAGENET100_CLASSES))


# --- Synthetic: class-dependent patterns, generated, for tests ------------------------------------
def load_synthetic(root: str, split: str, download: bool = False, size: int = 256, image_size: int = 32,
                   channels: int = 3, num_classes: int = 10, seed: int = 0) -> ArrayDataset:
    """Each class is a fixed random low-frequency pattern; images add noise and a random shift."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(torch.rand(num_classes, channels, 4, 4, generator=g), size=image_size,
                                               mode="bilinear", align_corners=False)
    g.manual_seed(seed + {"train": 1, "val": 2}[split])
    labels = torch.randint(num_classes, (size,), generator=g)
    x = patterns[labels] + 0.25 * torch.randn(size, channels, image_size, image_size, generator=g)
    shifts = torch.randint(-image_size // 8, image_size // 8 + 1, (size, 2), generator=g)
    x = torch.stack([torch.roll(img, tuple(s.tolist()), dims=(1, 2)) for img, s in zip(x, shifts)])
    images = (x.clamp(0, 1) * 255).to(torch.uint8)
    return ArrayDataset(images, labels, [f"class_{i}" for i in range(num_classes)])


SHAPES = ("disc", "square", "triangle", "cross", "ring")


def _shape_masks(shape: str, size: int, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(N, size, size) bool masks of one shape at per-image centres (N, 2) (x, y) and radii (N,), in pixels."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = c[None, :, None] - centres[:, 1, None, None], c[None, None, :] - centres[:, 0, None, None]
    r = radii[:, None, None]
    if shape == "disc":
        return x ** 2 + y ** 2 <= r ** 2
    if shape == "square":
        return (x.abs() <= 0.8 * r) & (y.abs() <= 0.8 * r)
    if shape == "triangle":  # apex up: inside three half-planes
        return (y <= 0.7 * r) & (y >= -r + 2 * x.abs())
    if shape == "cross":
        return ((x.abs() <= 0.3 * r) & (y.abs() <= r)) | ((y.abs() <= 0.3 * r) & (x.abs() <= r))
    return (x ** 2 + y ** 2 <= r ** 2) & (x ** 2 + y ** 2 >= (0.55 * r) ** 2)  # ring


def load_synthetic_colour(root: str, split: str, download: bool = False, size: int = 2048, image_size: int = 32,
                          lightness: float = 65.0, chroma: float = 35.0, noise: float = 0.03, seed: int = 0,
                          hue_lightness_step: float = 0.0, background_chroma: float = 0.0,
                          hue_jitter: float = 0.0) -> ArrayDataset:
    """Colour carries information: 10 classes = 5 shapes x 2 hues. Shape ``s`` is drawn in the hue at angle
    ``36 s`` or ``36 s + 180`` degrees (CIE Lab, lightness 65, chroma 35, all in the sRGB gamut: the two hues of a shape have the same
    L, so the gray image cannot tell them apart: an L-only representation tops out at 50%), at a random position
    and size, on a gray background of random lightness, plus Gaussian pixel noise. Since each shape has its own
    pair of hues, the colours are partly predictable from the gray image (what colorization learns).
    ``hue_lightness_step`` > 0 (a diagnostic, not the default): the second hue of each pair is drawn that much
    lighter (L = lightness + step, keep it in gamut: <= 10 at chroma 35), so the hue predicts the shape's lightness
    and the gray image tells the two hues apart (split-brain's ab -> L task then needs the hue).
    ``background_chroma`` > 0: each background takes a random hue at that chroma (clipped to the gamut) instead
    of gray, as natural images' backgrounds are coloured: an image's colours then no longer name its class by
    themselves (random features of ab stop classifying) while the shape's hue still does; ``hue_jitter``: the
    shapes' hues vary by up to that many degrees. Both draw from their own generator: with them 0 the images are
    the default ones, bit for bit."""
    from ssl_lightning.pretext.color import lab_to_rgb

    g = torch.Generator().manual_seed(seed + {"train": 1, "val": 2}[split])
    labels = torch.randint(2 * len(SHAPES), (size,), generator=g)
    shape, second = labels // 2, labels % 2
    g2 = torch.Generator().manual_seed(seed + {"train": 11, "val": 12}[split])  # the options' own: g's draws unchanged
    angle = torch.deg2rad(36.0 * shape + 180.0 * second + hue_jitter * (2 * torch.rand(size, generator=g2) - 1))
    fg = torch.stack([lightness + hue_lightness_step * second, chroma * angle.cos(), chroma * angle.sin()], 1)
    bg_l = torch.where(torch.rand(size, generator=g) < 0.5, 15 + 25 * torch.rand(size, generator=g),
                       85 + 10 * torch.rand(size, generator=g))  # clearly darker or lighter than the shape
    bg_angle = 2 * torch.pi * torch.rand(size, generator=g2)
    bg = torch.stack([bg_l, background_chroma * bg_angle.cos(), background_chroma * bg_angle.sin()], 1)
    centres = image_size / 2 + (torch.rand(size, 2, generator=g) - 0.5) * image_size / 4
    radii = image_size * (0.22 + 0.1 * torch.rand(size, generator=g))
    mask = torch.zeros(size, image_size, image_size, dtype=torch.bool)
    for s, name in enumerate(SHAPES):
        sel = shape == s
        mask[sel] = _shape_masks(name, image_size, centres[sel], radii[sel])
    lab = torch.where(mask[:, None], fg[:, :, None, None], bg[:, :, None, None])
    x = lab_to_rgb(lab) + noise * torch.randn(size, 3, image_size, image_size, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = [f"{name}_{h}" for name in SHAPES for h in ("hue_a", "hue_b")]
    return ArrayDataset(images, labels, classes)


DATASETS.register("fashion_mnist")(DatasetSpec(load_fashion_mnist, 10, 1, 28, (0.2860,), (0.3530,), default_root=FASHION_MNIST_DEB))
DATASETS.register("cifar10")(DatasetSpec(load_cifar(tvd.CIFAR10, "cifar-10-batches-py"), 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
DATASETS.register("cifar100")(DatasetSpec(load_cifar(tvd.CIFAR100, "cifar-100-python"), 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))
DATASETS.register("stl10")(DatasetSpec(load_stl10, 10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713),
                                       pretrain_split="pretrain"))
DATASETS.register("imagenet")(DatasetSpec(load_image_folder, 1000, 3, 224, IMAGENET_MEAN, IMAGENET_STD, resize_eval=True))
DATASETS.register("imagenet100")(DatasetSpec(load_imagenet100, 100, 3, 224, IMAGENET_MEAN, IMAGENET_STD, resize_eval=True))
DATASETS.register("image_folder")(DatasetSpec(load_image_folder, 0, 3, None, IMAGENET_MEAN, IMAGENET_STD, resize_eval=True))
DATASETS.register("synthetic")(DatasetSpec(load_synthetic, 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
DATASETS.register("synthetic_colour")(DatasetSpec(load_synthetic_colour, 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
