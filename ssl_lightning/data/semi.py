"""``SemiSupervisedDataModule``: a labelled subset, an unlabelled stream and held-out evaluation, for any
registered dataset.

Training batches are dicts (Lightning's ``CombinedLoader``, mode ``max_size_cycle``)::

    {"labelled": (x, y, idx), "unlabelled": (views, idx)}

* ``x`` ``(B, C, H, W)``: one weak view of ``B = batch_size`` labelled images (per process), ``y`` their
  labels, ``idx`` their positions in :attr:`labelled_set` (``labelled_indices[idx]`` = training-set index).
* ``views``: a list of ``(mu B, C, H, W)`` tensors, one per entry of ``unlabelled_views`` repeated
  ``k_unlabelled`` times (FixMatch ``["weak", "strong"]``; MixMatch ``["weak"]`` with K = 2); ``idx`` their
  positions in :attr:`unlabelled_set` (``0 .. num_unlabelled - 1``: the rows of per-sample state such as
  :class:`~ssl_lightning.semi.TemporalEnsemble`). Absent with ``mu = 0`` (the supervised baseline).

An epoch is one pass over the larger stream (or ``steps_per_epoch`` steps); the other stream cycles through
fresh shuffles (:class:`~ssl_lightning.data.cycle_sampler.CyclingSampler`, so both loaders have the same
length). Views are made per image in the loader workers, seeded per ``(seed, stream, epoch, pass, index)``:
independent of the number of workers and of processes (``batch_size`` is per process; W processes see the
samples of one process with W x the batch). ``augment="device"`` is not offered: RandAugment has no batched
implementation here.

Validation loaders, in the order of :attr:`eval_names`: ``"val"`` (carved from the training labels, for
model selection; absent with ``num_val=0``) and ``"test"`` (the dataset's test split: report its final
accuracy, never select on it). The split is written to ``<trainer.default_root_dir>/label_split.json`` (the
run directory) by the global-zero process in :meth:`setup`; pass that file as ``label_split`` to reuse the
split (every method of a table on the same split).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, default_collate

from ssl_lightning import distributed
from ssl_lightning.data.cycle_sampler import CyclingSampler
from ssl_lightning.data.datamodule import MultiViewDataset, ResumableLoader, SSLDataModule, TransformDataset, _subset
from ssl_lightning.data.label_split import LabelSplit, make_label_split
from ssl_lightning.data.semi_views import (StrongAugment, ViewList, WeakAugment, check_augments, strong_transform,
                                           weak_transform)
from ssl_lightning.data.views import eval_transform
from ssl_lightning.registry import SSLError

SPLIT_FILENAME = "label_split.json"
LABELLED_STREAM, UNLABELLED_STREAM = 0, 1
VIEW_KINDS = ("weak", "strong")


def dataset_targets(ds: Dataset) -> torch.Tensor:
    """The labels of a dataset without loading its images (``targets`` of the array and folder datasets,
    through Subset and ConcatDataset); falls back to reading every sample."""
    if isinstance(ds, Subset):
        return dataset_targets(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, ConcatDataset):
        return torch.cat([dataset_targets(d) for d in ds.datasets])
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets, dtype=torch.long)
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)


def collate_unlabelled(items: list[tuple]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(views, indices)``: the labels of the unlabelled stream are dropped."""
    views, indices = default_collate([(item[0], item[2]) for item in items])
    return views, indices


class SemiSupervisedDataModule(SSLDataModule):
    """A labelled subset, an unlabelled stream and validation / test loaders (see the module docstring).

    Args:
        dataset, root, download, image_size, dataset_options, eval_batch_size, pin_memory: as
            :class:`~ssl_lightning.data.SSLDataModule`.
        num_labels / labels_per_class: the labelled subset, stratified (one of the two, unless ``label_split``).
        label_split: a split file to reuse (a run's ``label_split.json``); refused if made for another dataset.
        num_val: validation images carved from the training labels (default: 10% of the labelled training
            images, 5000 of CIFAR's 50,000; 0: none).
        split_seed: seed of the split (default: ``seed``), so one split can serve several training seeds.
        batch_size: labelled images per process and step.
        mu: unlabelled images per labelled image in a step (FixMatch 7, MixMatch 1; 0 = no unlabelled stream).
        unlabelled: ``"all"``: every training image not in the validation set, labelled ones included
            (FixMatch, MixMatch, USB); ``"rest"``: only those neither labelled nor validation. For STL-10 both
            add its 100,000 unlabelled images.
        unlabelled_views, k_unlabelled: the views of each unlabelled image, each kind ``k_unlabelled`` times.
        weak, strong: the augmentations (:mod:`ssl_lightning.data.semi_views`).
        steps_per_epoch: steps per epoch (default: one pass over the larger stream).
        num_workers: loader workers of the unlabelled stream; labelled_workers: of the labelled stream
            (default ``num_workers // (1 + mu)``, at least 1 when ``num_workers > 0``).
        train_subset: use a seeded subset of that many training images (before the split).
        seed: the data seed (order and augmentations).
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str | None = None,
        download: bool = False,
        num_labels: int | None = None,
        labels_per_class: int | None = None,
        label_split: str | None = None,
        num_val: int | None = None,
        split_seed: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        mu: int = 7,
        unlabelled: Literal["all", "rest"] = "all",
        unlabelled_views: list[Literal["weak", "strong"]] | None = None,
        k_unlabelled: int = 1,
        weak: WeakAugment | None = None,
        strong: StrongAugment | None = None,
        steps_per_epoch: int | None = None,
        num_workers: int = 4,
        labelled_workers: int | None = None,
        image_size: int | None = None,
        train_subset: int | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        dataset_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(dataset=dataset, root=root, download=download, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, image_size=image_size,
                         seed=seed, pin_memory=pin_memory, dataset_options=dataset_options)
        self.unlabelled_views = list(unlabelled_views) if unlabelled_views is not None else ["weak", "strong"]
        self.weak, self.strong = weak or WeakAugment(), strong or StrongAugment()
        self._check_arguments(num_labels, labels_per_class, label_split, num_val, batch_size, mu, unlabelled,
                              k_unlabelled, steps_per_epoch)
        self.num_labels, self.labels_per_class, self.label_split = num_labels, labels_per_class, label_split
        self.num_val, self.split_seed = num_val, seed if split_seed is None else split_seed
        self.mu, self.unlabelled, self.k_unlabelled = mu, unlabelled, k_unlabelled
        self.steps_per_epoch, self.train_subset = steps_per_epoch, train_subset
        self.labelled_workers = labelled_workers if labelled_workers is not None else (
            max(1, num_workers // (1 + mu)) if num_workers > 0 else 0)
        self.split: LabelSplit | None = None
        self.labelled_set: Dataset | None = None
        self.unlabelled_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.labelled_indices: list[int] = []
        self.unlabelled_indices: list[int] = []

    def _check_arguments(self, num_labels, labels_per_class, label_split, num_val, batch_size, mu, unlabelled,
                         k_unlabelled, steps_per_epoch) -> None:
        if label_split is None and num_labels is None and labels_per_class is None:
            raise SSLError("No labelled subset given: set data.num_labels (labels in total, a multiple of the class "
                           "count, e.g. 250) or data.labels_per_class (e.g. 25), or data.label_split=<a "
                           "label_split.json> to reuse a split.")
        if num_labels is not None and labels_per_class is not None:
            raise SSLError(f"Both data.num_labels={num_labels} and data.labels_per_class={labels_per_class} are set: "
                           "give one of them.")
        if batch_size <= 0:
            raise SSLError(f"data.batch_size={batch_size}: use a positive number of labelled images per process.")
        if mu < 0:
            raise SSLError(f"data.mu={mu}: the ratio of unlabelled to labelled images per step must be >= 0 (FixMatch "
                           "7, MixMatch 1; 0 trains on the labelled images only).")
        if unlabelled not in ("all", "rest"):
            raise SSLError(f"data.unlabelled={unlabelled!r}: use \"all\" (every training image not held out for "
                           "validation, labelled ones included, as FixMatch) or \"rest\" (the images not labelled).")
        if k_unlabelled < 1:
            raise SSLError(f"data.k_unlabelled={k_unlabelled}: use K >= 1 augmentations of each view kind.")
        bad = [v for v in self.unlabelled_views if v not in VIEW_KINDS]
        if bad or (mu > 0 and not self.unlabelled_views):
            raise SSLError(f"data.unlabelled_views={self.unlabelled_views}: give a non-empty list of \"weak\" and "
                           "\"strong\" (FixMatch: [weak, strong]; MixMatch: [weak] with data.k_unlabelled=2).")
        if num_val is not None and num_val < 0:
            raise SSLError(f"data.num_val={num_val}: use num_val >= 0 (0 = no validation split).")
        if steps_per_epoch is not None and steps_per_epoch <= 0:
            raise SSLError(f"data.steps_per_epoch={steps_per_epoch}: use a positive number of steps (or leave it "
                           "unset for one pass over the larger stream).")
        check_augments(self.weak, self.strong)

    # ---- the split ------------------------------------------------------------------------------------------
    def _split_for(self, train: Dataset, targets: torch.Tensor) -> LabelSplit:
        classes = getattr(train.dataset if isinstance(train, Subset) else train, "classes", None)
        if self.label_split is None:
            num_val = self.num_val if self.num_val is not None else int(0.1 * int((targets >= 0).sum()))
            return make_label_split(targets, self.num_labels, self.labels_per_class, num_val, self.split_seed,
                                    num_classes=self.num_classes or None, dataset=self.dataset, class_names=classes)
        split = LabelSplit.load(self.label_split)
        split.check(targets, self.dataset, source=f"Label split {self.label_split}")
        per_class = split.num_labels // max(split.num_classes, 1)
        asked = {"data.num_labels": (self.num_labels, split.num_labels),
                 "data.labels_per_class": (self.labels_per_class, per_class),
                 "data.num_val": (self.num_val, len(split.val))}
        for name, (want, have) in asked.items():
            if want is not None and want != have:
                raise SSLError(f"{name}={want}, but the split in {self.label_split} has {have}: leave {name} unset "
                               "to use the file's split, or leave data.label_split unset to make a new one.")
        return split

    def _write_split(self) -> None:
        """Save the split in the run directory (global zero); refuse a run directory holding another split."""
        trainer = self.trainer
        if trainer is None or self.split is None:
            return
        path = Path(trainer.default_root_dir) / SPLIT_FILENAME
        if self.label_split is not None and path.exists() and path.resolve() == Path(self.label_split).resolve():
            return
        if path.exists():  # a resumed run, or a run directory used again
            existing = LabelSplit.load(path)
            same = (existing.labelled, existing.val, existing.targets_sha256) == \
                   (self.split.labelled, self.split.val, self.split.targets_sha256)
            if not same:
                raise SSLError(f"The run directory {trainer.default_root_dir} holds another label split ({path}): use "
                               f"a new run directory, or pass data.label_split={path} to train on that split.")
            return
        if trainer.is_global_zero:
            self.split.save(path)

    # ---- datasets -------------------------------------------------------------------------------------------
    def _unlabelled_pool(self, train: Dataset) -> Dataset:
        """The training set, followed by the extra unlabelled images of datasets that have them (STL-10)."""
        if self.spec.pretrain_split == "train":
            return train
        full, labelled = self._load(self.spec.pretrain_split), self._load("train")
        n = len(labelled)
        if len(full) < n or not torch.equal(dataset_targets(full)[:n], dataset_targets(labelled)):
            raise SSLError(f"The {self.spec.pretrain_split!r} split of {self.dataset} does not start with its training "
                           "images: cannot add its unlabelled images to the unlabelled stream.")
        return ConcatDataset([train, Subset(full, range(n, len(full)))])

    def setup(self, stage: str | None = None) -> None:
        if self.labelled_set is None:
            if self.num_classes <= 0:
                raise SSLError(f"{self.dataset} has no classes: semi-supervised learning needs labelled training images "
                               "(image folders with one sub-folder per class).")
            train = _subset(self._load("train"), self.train_subset, self.seed)
            targets = dataset_targets(train)
            self.split = self._split_for(train, targets)
            pool = self._unlabelled_pool(train)
            held_out = set(self.split.val) | (set(self.split.labelled) if self.unlabelled == "rest" else set())
            self.unlabelled_indices = [i for i in range(len(pool)) if i not in held_out]
            self.labelled_indices = list(self.split.labelled)
            if self.mu > 0 and not self.unlabelled_indices:
                raise SSLError(f"No unlabelled images are left with data.unlabelled=\"rest\" ({len(self.labelled_indices)} "
                               f"labelled + {len(self.split.val)} validation of {len(train)} images) but data.mu="
                               f"{self.mu}: use data.unlabelled=\"all\", fewer labels or validation images, or "
                               "data.mu=0 for the supervised baseline.")
            resize = self.spec.resize_eval
            weak = weak_transform(self.image_size, self.mean, self.std, self.weak, resize)
            strong = strong_transform(self.image_size, self.mean, self.std, self.weak, self.strong, resize)
            views = [weak if kind == "weak" else strong for kind in self.unlabelled_views for _ in range(self.k_unlabelled)]
            self.labelled_set = MultiViewDataset(Subset(train, self.labelled_indices), weak)
            self.unlabelled_set = MultiViewDataset(Subset(pool, self.unlabelled_indices), ViewList(views))
            evaluate = eval_transform(self.image_size, self.mean, self.std, resize)
            self.val_set = TransformDataset(Subset(train, list(self.split.val)), evaluate) if self.split.val else None
            test = self._load("val")
            self.test_set = TransformDataset(test, evaluate) if test is not None else None
        self._write_split()

    # ---- what a method needs to know ------------------------------------------------------------------------
    @property
    def num_labelled(self) -> int:
        return len(self.labelled_indices)

    @property
    def num_unlabelled(self) -> int:
        return len(self.unlabelled_indices)

    @property
    def eval_names(self) -> list[str]:
        """Names of the validation loaders, in order (``"val"`` for model selection, ``"test"`` reported only)."""
        return [name for name, ds in (("val", self.val_set), ("test", self.test_set)) if ds is not None]

    def steps(self) -> int:
        """Steps per epoch: ``steps_per_epoch``, else one pass over the larger stream (at least 1)."""
        if self.steps_per_epoch:
            return self.steps_per_epoch
        w = distributed.world_size()
        labelled = self.num_labelled // (self.batch_size * w)
        unlabelled = self.num_unlabelled // (self.mu * self.batch_size * w) if self.mu > 0 else 0
        return max(labelled, unlabelled, 1)

    # ---- loaders --------------------------------------------------------------------------------------------
    def _stream(self, ds: Dataset, batch: int, steps: int, stream: int, workers: int, epoch: int, done: int,
                **kwargs) -> DataLoader:
        sampler = CyclingSampler(ds, steps * batch, seed=self.seed, stream=stream, epoch=epoch, skip=done * batch)
        # an own generator for the workers' base seed (views are seeded per sample): iterating the loader leaves
        # the global RNG alone, so that a resumed run continues with the same global random numbers
        return ResumableLoader(ds, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                               pin_memory=self.pin_memory, persistent_workers=workers > 0,
                               generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def train_dataloader(self) -> CombinedLoader:
        """The labelled and unlabelled streams, one batch of each per step; resumed mid-epoch from a checkpoint's
        position (``SSLDataModule.state_dict``), both skip the batches the interrupted run trained on."""
        if self.labelled_set is None:
            self.setup("fit")
        steps = self.steps()
        epoch, done = self._resume_at or (0, 0)
        self._resume_at = None  # once: a later fit without ckpt_path starts at epoch 0
        loaders = {"labelled": self._stream(self.labelled_set, self.batch_size, steps, LABELLED_STREAM,
                                            self.labelled_workers, epoch, done)}
        if self.mu > 0:
            loaders["unlabelled"] = self._stream(self.unlabelled_set, self.mu * self.batch_size, steps,
                                                 UNLABELLED_STREAM, self.num_workers, epoch, done,
                                                 collate_fn=collate_unlabelled)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        if self.labelled_set is None:
            self.setup("validate")
        return [self._loader(ds, self.eval_batch_size) for ds in (self.val_set, self.test_set) if ds is not None]

    def test_dataloader(self) -> DataLoader:
        if self.labelled_set is None:
            self.setup("test")
        if self.test_set is None:
            raise SSLError(f"{self.dataset} has no test split here (no val/ folder): nothing to test on.")
        return self._loader(self.test_set, self.eval_batch_size)
