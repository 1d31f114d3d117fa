"""Labelled data for the evaluation commands, read through the same dataset registry as pretraining
(``SSLDataModule._load``). Training-side sets are built from the ``train`` split only and validation
sets from the ``val`` split only: no evaluation ever fits anything on the split it reports.

Train augmentation (linear evaluation, fine-tuning): random resized crop + horizontal flip;
evaluation: resize + centre crop (datasets of varying image size) or the image as is, then normalise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from ssl_lightning.data.datamodule import SSLDataModule, TransformDataset, _subset
from ssl_lightning.data.views import ViewConfig, build_view, eval_transform
from ssl_lightning.registry import SSLError

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


@dataclass
class EvalData:
    """Which data an evaluation uses.

    Args:
        dataset: a registered dataset; None = the pretraining dataset (from the run's config.yaml).
        root: where its files are (None: the run's, or the dataset's usual place).
        dataset_options: extra loader options (None: the run's when the dataset is the run's).
        image_size: crop size (None: the run's, or the dataset's).
        batch_size: training images per process and step (learning rates are given per 256).
        eval_batch_size: images per batch when extracting features / validating.
        num_workers: data loader workers.
        train_subset / val_subset: a seeded random subset of that many images of each split.
        crop_scale: random-resized-crop area range of the training augmentation.
        grayscale: convert images to the backbone's channel count (RGB <-> 1-channel luma) when they differ.
        input: the input space of a colour method's encoder (``lightness``: Lab ``(L - 50) / 100``; ``lab``: that
            and ``ab / 110``), read from its checkpoint: the RGB images are converted to it
            (:class:`~ssl_lightning.pretext.color.ToNetworkInput`) instead of normalised.
        seed: seed of the subsets.
        on_bad_image: ``error`` or ``skip`` an unreadable image file (None: the run's when the dataset is the
            run's, else ``error``); see ``SSLDataModule``.
    """

    dataset: str | None = None
    root: str | None = None
    dataset_options: dict[str, Any] | None = None
    image_size: int | None = None
    batch_size: int = 256
    eval_batch_size: int = 512
    num_workers: int = 4
    train_subset: int | None = None
    val_subset: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    grayscale: bool = False
    seed: int = 0
    on_bad_image: Literal["error", "skip"] | None = None
    input: str | None = None  # a colour method's encoder input ("lightness", "lab"): set from the checkpoint


class ToChannels:
    """Image (PIL or uint8 tensor ``(C, H, W)``) -> ``channels`` channels: RGB -> luma, or gray -> RGB."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image):
        if not isinstance(image, torch.Tensor):
            return image.convert("L" if self.channels == 1 else "RGB")
        if image.shape[0] == self.channels:
            return image
        if self.channels == 1:
            return v2.functional.rgb_to_grayscale(image)
        return image.expand(self.channels, -1, -1)


@dataclass
class EvalSplits:
    """The train / val splits of one dataset with their transforms (see :func:`eval_splits`)."""

    name: str
    datamodule: SSLDataModule
    train_base: Dataset
    val_base: Dataset
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_eval: bool
    settings: EvalData
    convert: ToChannels | None = field(default=None)

    def _with_channels(self, transform):
        return v2.Compose([self.convert, transform]) if self.convert else transform

    def train_transform(self):
        crop = ViewConfig(size=self.image_size, scale=tuple(self.settings.crop_scale), hflip=0.5, jitter=0.0, grayscale=0.0)
        return self._with_channels(build_view(crop, self.mean, self.std))

    def eval_transform(self):
        return self._with_channels(eval_transform(self.image_size, self.mean, self.std, self.resize_eval))

    def train_set(self, augment: bool, indices: list[int] | None = None) -> Dataset:
        """The training split (or its ``indices``), augmented or not."""
        base = self.train_base if indices is None else Subset(self.train_base, indices)
        return TransformDataset(base, self.train_transform() if augment else self.eval_transform())

    def val_set(self) -> Dataset:
        return TransformDataset(self.val_base, self.eval_transform())

    def loader(self, ds: Dataset, train: bool) -> DataLoader:
        s = self.settings
        return DataLoader(ds, batch_size=s.batch_size if train else s.eval_batch_size, shuffle=train, drop_last=False,
                          num_workers=s.num_workers, persistent_workers=False, pin_memory=torch.cuda.is_available())


def resolve_data(data: EvalData, info: dict[str, Any]) -> EvalData:
    """Fills unset fields from the pretraining run's data settings (``info["data"]``) when the dataset
    is the run's; the dataset itself must then be known."""
    run = info.get("data") or {}
    name = data.dataset or run.get("dataset")
    if name is None:
        raise SSLError(f"Which dataset? {info.get('checkpoint')!r} has no run config.yaml to read it from: "
                       "give --data.dataset (e.g. --data.dataset cifar10)")
    same = name == run.get("dataset")
    return EvalData(**{**data.__dict__, "dataset": name,
                       "root": data.root or (run.get("root") if same else None),
                       "dataset_options": data.dataset_options if data.dataset_options is not None
                       else (run.get("dataset_options") if same else None),
                       "image_size": data.image_size or (run.get("image_size") if same else None),
                       "on_bad_image": data.on_bad_image or (run.get("on_bad_image") if same else None),
                       "input": data.input or info.get("input")})


def eval_splits(data: EvalData, in_channels: int) -> EvalSplits:
    """The labelled train and val splits of ``data.dataset`` for a backbone taking ``in_channels``."""
    dm = SSLDataModule(dataset=data.dataset, root=data.root, batch_size=data.batch_size, num_workers=data.num_workers,
                       image_size=data.image_size, seed=data.seed, pin_memory=False, dataset_options=data.dataset_options,
                       on_bad_image=data.on_bad_image or "error")
    if dm.num_classes <= 0:
        raise SSLError(f"Dataset {data.dataset!r} has no labels here: evaluations need labelled train and val splits "
                       "(image folders need one sub-folder per class)")
    train, val = dm._load("train"), dm._load("val")
    if val is None:
        raise SSLError(f"Dataset {data.dataset!r} has no validation split under {dm.root!r}: "
                       "evaluations report on it (image folders need root/train and root/val)")
    mean, std, channels, convert = tuple(dm.mean), tuple(dm.std), dm.in_channels, None
    if data.input is not None:  # a colour method's encoder: RGB -> its Lab input, already normalised
        from ssl_lightning.pretext.color import ToNetworkInput, refuse_gray

        refuse_gray(f"this backbone (input {data.input!r})", channels)
        convert, mean, std = ToNetworkInput(data.input), (0.0,) * in_channels, (1.0,) * in_channels
    elif channels != in_channels:
        if not data.grayscale or {channels, in_channels} != {1, 3}:
            raise SSLError(f"The backbone takes {in_channels}-channel images but {data.dataset} has {channels}: "
                           + ("add --data.grayscale true to convert them" if {channels, in_channels} == {1, 3}
                              else "evaluate it on a dataset with matching channels"))
        convert = ToChannels(in_channels)
        if in_channels == 1:  # luma of the RGB statistics (the std is an approximation)
            mean, std = (sum(w * m for w, m in zip(GRAY, mean)),), (sum(w * s for w, s in zip(GRAY, std)),)
        else:
            mean, std = mean * 3, std * 3
    return EvalSplits(data.dataset, dm, _subset(train, data.train_subset, data.seed), _subset(val, data.val_subset, data.seed),
                      dm.num_classes, in_channels, dm.image_size, mean, std, dm.spec.resize_eval, data, convert)


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """Labels of a dataset (``targets`` of ours and torchvision's, through Subsets) without reading images."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)
