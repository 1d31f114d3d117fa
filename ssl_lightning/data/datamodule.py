"""``SSLDataModule``: multi-view training batches and un-augmented evaluation loaders for any dataset.

Training batches are ``(views, labels, indices)``: ``views`` a list of tensors ``(B, C, H, W)``,
one per view (see :mod:`ssl_lightning.data.views`), ``labels`` -1 for unlabelled images, and
``indices`` the samples' positions in the training set (for memory banks and per-sample state).
Validation gives two loaders of ``(image, label)``: the un-augmented training set (index 0, the kNN
bank) and the validation set (index 1).

Where the views are made (``augment``): ``"workers"`` (default) runs the per-image torchvision pipeline in
the loader workers; ``"device"`` has the loader collate the un-augmented uint8 images (4x less to copy than
float views, pinned, copied non-blocking) and :meth:`SSLDataModule.on_after_batch_transfer` augment the
whole batch on the training device (:class:`~ssl_lightning.data.batch_views.BatchMultiView`).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from functools import cached_property
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.transforms.v2 import functional as TF

from ssl_lightning import distributed
from ssl_lightning.data.batch_views import BatchMultiView
from ssl_lightning.data.datasets import DATASETS, DatasetSpec
from ssl_lightning.data.folder import ImageFolderDataset
from ssl_lightning.data.image_size import ImageSides, image_sides, size_for, upsampling_warning
from ssl_lightning.data.sampler import SeededSampler
from ssl_lightning.data.views import MultiViewTransform, ViewConfig, eval_transform, view_preset
from ssl_lightning.data.workers import survive_stop_signals
from ssl_lightning.registry import SSLError
from ssl_lightning.resume import next_batch_position

TRAIN_EVAL, VAL = 0, 1  # validation dataloader indices


class MultiViewDataset(Dataset):
    """``dataset[(i, seed)] -> (views, label, i)``, the views drawn with torch's RNG seeded by ``seed``."""

    def __init__(self, base: Dataset, transform: MultiViewTransform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int] | int):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.base[index]
        if seed is None:
            return self.transform(image), label, index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label, index


class RawImageDataset(Dataset):
    """``dataset[(i, seed)] -> (image, label, i, seed)``: the un-augmented uint8 image ``(C, H, W)``, for
    augmentation on the device. Images of varying size are resized (shorter side, antialiased) and centre
    cropped to ``load_size`` so that they batch; fixed-size images are passed as they are."""

    def __init__(self, base: Dataset, load_size: int | None = None) -> None:
        self.base, self.load_size = base, load_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int] | int):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.base[index]
        image = image if isinstance(image, torch.Tensor) else TF.pil_to_tensor(image)
        if self.load_size is not None:
            image = TF.center_crop(TF.resize(image, self.load_size, antialias=True), self.load_size)
        return torch.Tensor.as_subclass(image, torch.Tensor), label, index, seed


def collate_raw(items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    """``(uint8 images (B, C, H, W), labels, indices, batch seed)``; the batch seed (an int that stays on the
    host) is a hash of the samples' seeds, i.e. of ``(data seed, epoch, indices)``: it seeds the batch's views."""
    images, labels, indices = default_collate([item[:3] for item in items])
    seeds = [item[3] for item in items]
    if any(s is None for s in seeds):
        return images, labels, indices, None
    digest = hashlib.blake2b(torch.tensor(seeds, dtype=torch.int64).numpy().tobytes(), digest_size=8).digest()
    return images, labels, indices, int.from_bytes(digest, "little") >> 1


class TransformDataset(Dataset):
    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


class ResumableLoader(DataLoader):
    """The training loader. Its own state is empty: the position in the epoch is saved and restored by
    :meth:`SSLDataModule.state_dict` (from the trainer's batch counter, which a prefetching loader cannot
    know); having ``state_dict``/``load_state_dict`` tells Lightning that it resumes mid-epoch correctly."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, sorted(perm.tolist()))


class SSLDataModule(L.LightningDataModule):
    """Any registered dataset with a multi-view augmentation.

    Args:
        dataset: a registered name (fashion_mnist, cifar10, cifar100, stl10, imagenet, imagenet100,
            image_folder, synthetic).
        root: where the files are (default: the dataset's usual place, e.g. Debian's Fashion-MNIST).
        download: fetch through torchvision when the files are missing.
        batch_size: images per process and step.
        views: a preset name (``simclr``, ``byol``, ``multicrop``) or a list of :class:`ViewConfig`.
        image_size: crop size of the global views (default: the dataset's; ``image_folder``: from the
            images, the largest common size not above their median shorter side, see
            :mod:`ssl_lightning.data.image_size`). Crops over 2x the images' shorter side are warned about.
        train_subset / eval_subset / val_subset: use a seeded random subset of that many images of
            the pretraining set, of the un-augmented training set (kNN bank) and of the validation set.
        dataset_options: extra keyword arguments of the dataset loader (``class_list`` for folders,
            ``size``/``num_classes``/``channels``/``image_size`` for ``synthetic``).
        augment: ``"workers"``: each image's views made by the torchvision pipeline in the loader workers;
            ``"device"``: the loader sends uint8 images and the whole batch is augmented on the training
            device (same augmentation distributions, see :mod:`ssl_lightning.data.batch_views`).
        load_size: with ``augment="device"``, images of varying size (image folders) are loaded resized
            (shorter side) and centre-cropped to this side, default ``image_size / 0.875`` (256 for 224),
            and crops are drawn from that square -- an approximation: the per-image pipeline crops the
            whole original image, borders of non-square images included.
        on_bad_image: an unreadable image file: ``"error"`` stops with an error naming it; ``"skip"``
            warns (once per file and process) and uses the next readable image, ``(i + 1) % n``, so that
            batches keep their size. ``ssl-lightning check-data`` lists them all before a run.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str | None = None,
        download: bool = False,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 4,
        views: str | list[ViewConfig] = "simclr",
        num_local_crops: int = 6,
        image_size: int | None = None,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        val_subset: int | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        dataset_options: dict[str, Any] | None = None,
        augment: Literal["workers", "device"] = "workers",
        load_size: int | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__()
        self.spec: DatasetSpec = DATASETS.get(dataset)
        self.dataset, self.download = dataset, download
        self.root = root or self.spec.default_root
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.options = dict(dataset_options or {})
        # None: image folders, sized from their images when first needed (image_size, view_configs, load_size)
        self.given_image_size = image_size or self.options.get("image_size", self.spec.image_size)
        if isinstance(views, str):
            view_preset(views, 224, num_local_crops)  # an unknown preset name fails here, before any file is read
        self._views, self._num_local_crops, self._load_size = views, num_local_crops, load_size
        self.train_subset, self.eval_subset, self.val_subset, self.seed = train_subset, eval_subset, val_subset, seed
        self.pin_memory = pin_memory
        if augment not in ("workers", "device"):
            raise SSLError(f"Unknown data.augment {augment!r}: use \"workers\" (per-image, in the loader workers) "
                           "or \"device\" (whole batches on the training device)")
        self.augment = augment
        if on_bad_image not in ("error", "skip"):
            raise SSLError(f"Unknown data.on_bad_image {on_bad_image!r}: use \"error\" (stop at an unreadable image) "
                           "or \"skip\" (warn and use the next readable image)")
        self.on_bad_image = on_bad_image
        self.mean = self.spec.mean if self.in_channels == len(self.spec.mean) else self.spec.mean[:1] * self.in_channels
        self.std = self.spec.std if self.in_channels == len(self.spec.std) else self.spec.std[:1] * self.in_channels
        self._loaded: dict[str, Dataset | None] = {}
        self.pretrain_set: Dataset | None = None
        self.eval_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

    # ---- what the model needs to know before the data is loaded (linked by the CLI) -------------
    @property
    def in_channels(self) -> int:
        return int(self.options.get("channels", self.spec.channels))

    @cached_property
    def num_classes(self) -> int:
        """Classes of the labelled training set (0 for unlabelled data: no probe, no kNN)."""
        if "num_classes" in self.options:
            return int(self.options["num_classes"])
        if self.spec.num_classes > 0 and "class_list" not in self.options:  # a class list sets the classes
            return self.spec.num_classes
        return len(getattr(self._load("train"), "classes", []))

    # ---- sizes: given, the dataset's, or (image folders) from the images --------------------------------
    @cached_property
    def image_sides(self) -> ImageSides | None:
        """Median shorter side of the pretraining images (a seeded sample's headers for folders)."""
        return image_sides(self._load(self.spec.pretrain_split))

    @cached_property
    def image_size(self) -> int:
        """Crop size of the global views; derived from the images when neither given nor the dataset's."""
        if self.given_image_size is not None:
            return int(self.given_image_size)
        sides = self.image_sides
        if sides is None:
            raise SSLError(f"Dataset {self.dataset!r} has no default image size and its images cannot be sized: "
                           "set data.image_size")
        size = size_for(sides.median)
        rank_zero_info(f"[ssl_lightning] image_size {size} from the data ({sides.describe()}); "
                       "set data.image_size to override")
        return size

    @cached_property
    def view_configs(self) -> list[ViewConfig]:
        views = self._views if isinstance(self._views, list) else view_preset(self._views, self.image_size,
                                                                               self._num_local_crops)
        return [v if v.size else replace(v, size=self.image_size) for v in views]

    @cached_property
    def load_size(self) -> int:
        return self._load_size or int(round(self.image_size / 0.875))

    @cached_property
    def batch_views(self) -> BatchMultiView | None:
        return BatchMultiView(self.view_configs, self.mean, self.std) if self.augment == "device" else None

    def _warn_upsampling(self) -> None:
        message = upsampling_warning(max(v.size for v in self.view_configs), self.image_sides)
        if message:
            rank_zero_warn(message)

    def _load(self, split: str, download: bool = False) -> Dataset | None:
        """Each split is read once (the pretraining split is usually the training split itself)."""
        if split not in self._loaded:
            ds = self.spec.load(self.root, split, download, **self.options)
            if isinstance(ds, ImageFolderDataset):
                ds.on_bad_image = self.on_bad_image
            self._loaded[split] = ds
        return self._loaded[split]

    def prepare_data(self) -> None:
        if self.download:  # once per node, before setup() runs on every process
            for split in {self.spec.pretrain_split, "train", "val"}:
                self._load(split, download=True)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.pretrain_set is None:
            base = _subset(self._load(self.spec.pretrain_split), self.train_subset, self.seed)
            global_batch = self.batch_size * distributed.world_size()
            if len(base) < global_batch:
                raise SSLError(
                    f"The global batch ({self.batch_size} per process x {distributed.world_size()} processes = "
                    f"{global_batch}) is larger than the training set ({len(base)} images): lower "
                    "data.batch_size or use more images (data.train_subset).")
            self._warn_upsampling()
            if self.augment == "device":
                self.pretrain_set = RawImageDataset(base, self.load_size if self.spec.resize_eval else None)
            else:
                self.pretrain_set = MultiViewDataset(base, MultiViewTransform(self.view_configs, self.mean, self.std))
        if self.eval_set is None and self.num_classes > 0:
            evaluate = eval_transform(self.image_size, self.mean, self.std, self.spec.resize_eval)
            val = self._load("val")
            if val is not None:
                self.eval_set = TransformDataset(_subset(self._load("train"), self.eval_subset, self.seed), evaluate)
                self.val_set = TransformDataset(_subset(val, self.val_subset, self.seed), evaluate)

    # ---- loaders ------------------------------------------------------------------------------------
    def _loader(self, ds: Dataset, batch_size: int, cls: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        # an own generator for the workers' base seed: iterating a loader leaves the global RNG alone, so that it
        # is at the same place after a resume (see ssl_lightning.resume)
        workers = self.num_workers > 0
        return cls(ds, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                   persistent_workers=workers, generator=torch.Generator().manual_seed(self.seed),
                   worker_init_fn=survive_stop_signals if workers else None, **kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.pretrain_set is None:
            self.setup("fit")
        epoch, done = self._resume_at or (0, 0)
        self._resume_at = None  # once: a later fit without ckpt_path starts at epoch 0
        sampler = self._train_sampler(epoch, done * self.batch_size)
        collate = {"collate_fn": collate_raw} if self.augment == "device" else {}
        return self._loader(self.pretrain_set, self.batch_size, ResumableLoader, sampler=sampler, drop_last=True,
                            **collate)

    def _train_sampler(self, epoch: int, skip: int) -> SeededSampler:
        """:class:`SeededSampler`, or the sampler of a method that decides what each epoch trains on: a module with
        ``train_sampler(dataset, seed=, epoch=, skip=)`` (DeepCluster: uniform over its clusters)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        make = getattr(module, "train_sampler", None)
        if make is not None:
            return make(self.pretrain_set, seed=self.seed, epoch=epoch, skip=skip)
        return SeededSampler(self.pretrain_set, seed=self.seed, epoch=epoch, skip=skip)

    def pretrain_eval_set(self) -> Dataset:
        """The pretraining images (same indices as the training batches' ``indices``) with the un-augmented
        evaluation transform (resize + centre crop where the dataset's images vary in size), e.g. for clustering
        the whole training set."""
        if self.pretrain_set is None:
            self.setup("fit")
        evaluate = eval_transform(self.image_size, self.mean, self.std, self.spec.resize_eval)
        return TransformDataset(self.pretrain_set.base, evaluate)

    # ---- resuming mid-epoch --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the epoch of the next training batch and how many of its batches (per process)
        are done, so that a resumed run trains the rest of that epoch on the same samples with the same views."""
        if self.trainer is None:
            return {}
        epoch, done = next_batch_position(self.trainer)
        return {"train_epoch": epoch, "train_batches_done": done, "batch_size": self.batch_size,
                "world_size": self.trainer.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning when resuming, before :meth:`train_dataloader`."""
        if "train_epoch" not in state_dict:
            return
        self._resume_at = (int(state_dict["train_epoch"]), int(state_dict["train_batches_done"]))
        saved = (state_dict.get("batch_size"), state_dict.get("world_size"))
        now = (self.batch_size, self.trainer.world_size if self.trainer is not None else saved[1])
        if self._resume_at[1] and saved != now:
            rank_zero_warn(f"Resuming mid-epoch with batch size x processes {now[0]} x {now[1]} instead of the "
                           f"checkpoint's {saved[0]} x {saved[1]}: the rest of epoch {self._resume_at[0]} skips "
                           f"{self._resume_at[1]} batches of the new size, so it is not the interrupted run's.")

    def val_dataloader(self) -> list[DataLoader]:
        if self.eval_set is None:
            return []
        return [self._loader(self.eval_set, self.eval_batch_size), self._loader(self.val_set, self.eval_batch_size)]

    # ---- augmentation on the device ------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``augment="device"``, turns a training batch ``(uint8 images, labels, indices, seed)``, now on
        the device, into ``(views, labels, indices)``; validation batches and ``"workers"`` batches pass."""
        if self.augment != "device" or (self.trainer is not None and not self.trainer.training):
            return batch
        return self.augment_batch(batch)

    def augment_batch(self, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The views of a ``collate_raw`` batch, drawn with a generator seeded by the batch seed."""
        images, labels, indices, seed = batch
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return self.batch_views(images, generator), labels, indices
