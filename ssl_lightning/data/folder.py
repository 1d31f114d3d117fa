"""Image folders: ImageNet-style class sub-folders (optionally restricted by a class-list file) or a
flat folder of unlabelled images (label -1). An unreadable image raises an error naming the file
(``on_bad_image="error"``) or is replaced by the next readable one (``"skip"``), with a warning."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ssl_lightning.registry import SSLError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError)  # what PIL raises for corrupt or truncated files
_SKIPPED: dict[str, str] = {}  # unreadable files met in this process (path -> why), with on_bad_image="skip"


class BadImageWarning(UserWarning):
    """An unreadable image was replaced by the next readable one (``data.on_bad_image: skip``)."""


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

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None,
                 on_bad_image: Literal["error", "skip"] = "error") -> None:
        self.root, self.on_bad_image = Path(root), on_bad_image
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
        """Sample ``i``; with ``on_bad_image="skip"`` an unreadable one is replaced by the next readable
        sample, ``(i + 1) % n``, ... : deterministic, whatever the loader workers (the label comes with it)."""
        n, skip = len(self.samples), self.on_bad_image == "skip"
        if not -n <= i < n:
            raise IndexError(f"sample {i} of a folder of {n} images")
        for step in range(n if skip else 1):
            path, label = self.samples[(i + step) % n]
            if skip and path in _SKIPPED:
                continue
            try:
                with Image.open(path) as img:
                    return img.convert("RGB"), label
            except READ_ERRORS as e:
                if not skip:
                    raise SSLError(f"Cannot read image {path}: {e}. Remove or replace this file (`ssl-lightning "
                                   "check-data` with the same data settings lists every unreadable file; "
                                   "data.on_bad_image=skip replaces them by the next readable image).") from None
                _SKIPPED[path] = str(e)
                warnings.warn(f"[ssl_lightning] Cannot read image {path}: {e}. Replaced by the next readable image "
                              f"(data.on_bad_image=skip); {len(_SKIPPED)} unreadable image"
                              f"{'s' if len(_SKIPPED) > 1 else ''} skipped so far in this process.",
                              BadImageWarning, stacklevel=2)
        raise SSLError(f"No readable image in {self.root}: all {n} files failed to load. Check the folder with "
                       "`ssl-lightning check-data`.")


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
