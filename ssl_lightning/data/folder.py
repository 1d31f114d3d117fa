"""Image folders: ImageNet-style class sub-folders (optionally restricted by a class-list file) or a
flat folder of unlabelled images (label -1). Unreadable images raise an error naming the file."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ssl_lightning.registry import SSLError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_class_list(path: str | os.PathLike) -> list[str]:
    """One class (folder name, e.g. an ImageNet wnid) per line; blank lines and '#' comments ignored."""
    p = Path(path)
    if not p.is_file():
        raise SSLError(f"Class-list file {p} does not exist: pass class_list with a text file of one class folder name per line")
    names = [line.split("#")[0].strip() for line in p.read_text().splitlines()]
    return [n for n in names if n]


class ImageFolderDataset(Dataset):
    """``(image, label)`` from ``root/<class>/<image>`` or, for a flat folder, ``(image, -1)``."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SSLError(f"Image folder {self.root} does not exist: set data.root to a folder of images "
                           "(class sub-folders for labels, or images directly for unlabelled data)")
        subdirs = sorted(d.name for d in os.scandir(self.root) if d.is_dir())
        if classes is not None:
            missing = [c for c in classes if c not in subdirs]
            if missing:
                raise SSLError(f"{len(missing)} classes of the class list are not folders in {self.root}: "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            subdirs = list(classes)
        self.samples: list[tuple[str, int]] = []
        if subdirs:
            self.classes = subdirs
            for label, name in enumerate(subdirs):
                for dirpath, _, files in sorted(os.walk(self.root / name, followlinks=True)):
                    self.samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if _is_image(f)]
        else:
            self.classes = []
            self.samples = [(str(self.root / f), -1) for f in sorted(os.listdir(self.root)) if _is_image(f)]
        if not self.samples:
            raise SSLError(f"No images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                           "add images, or point data.root at the folder that holds them")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise SSLError(f"Cannot read image {path}: {e}. Remove or replace this file.") from None


class ArrayDataset(Dataset):
    """In-memory uint8 images ``(N, C, H, W)`` with integer labels (-1 = unlabelled)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("ArrayDataset expects uint8 images of shape (N, C, H, W)")
        self.images, self.targets = images, labels.long()
        self.classes = classes or []

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])
