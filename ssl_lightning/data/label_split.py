"""Seeded, stratified label splits for semi-supervised learning, saved as a small JSON file.

A split of a labelled training set of N images: ``labelled`` (the images whose labels training may use, the
same number in every class), ``val`` (a validation set carved from the remaining training labels, for model
selection) and the rest (:meth:`LabelSplit.rest`). Within each class the images are shuffled once by the
seed; the first ones go to validation, the next ones are labelled. So, for one seed and validation size, the
validation set does not depend on the number of labels and the labelled sets are nested (the 250-label set
lies inside the 4000-label one).

The file records the indices, the arguments, the dataset's name and size and a SHA-256 of its targets: a
split loaded for another dataset (or another subset, class list or label order) is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ssl_lightning.registry import SSLError

FORMAT = "ssl_lightning.label_split"
VERSION = 1


def targets_checksum(targets: torch.Tensor) -> str:
    """SHA-256 of the targets as little-endian int64."""
    data = torch.as_tensor(targets, dtype=torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class LabelSplit:
    """Indices into a training set of ``num_samples`` images (see the module docstring)."""

    labelled: tuple[int, ...]
    val: tuple[int, ...]
    num_samples: int
    num_classes: int
    targets_sha256: str
    dataset: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)  # num_labels, labels_per_class, num_val, seed

    @property
    def num_labels(self) -> int:
        return len(self.labelled)

    def rest(self) -> list[int]:
        """Indices in neither the labelled nor the validation set (ascending)."""
        used = set(self.labelled) | set(self.val)
        return [i for i in range(self.num_samples) if i not in used]

    # ---- checks -----------------------------------------------------------------------------------------
    def check(self, targets: torch.Tensor, dataset: str = "", source: str = "This label split") -> None:
        """Refuse a split made for another dataset: a different size or different targets."""
        targets = torch.as_tensor(targets)
        made_for = f"{self.dataset or 'a dataset'} ({self.num_samples} training images)"
        here = f"{dataset or 'this dataset'} ({len(targets)} training images)"
        if len(targets) != self.num_samples:
            raise SSLError(f"{source} was made for {made_for}, not for {here}: make a new split for this dataset "
                           "(leave data.label_split unset) or pass the split file made for it.")
        if targets_checksum(targets) != self.targets_sha256:
            raise SSLError(f"{source} was made for {made_for}, whose labels differ from those of {here} (another "
                           "dataset, subset, class list or label order): make a new split for this dataset (leave "
                           "data.label_split unset) or pass the split file made for it.")
        labels = targets[list(self.labelled) + list(self.val)] if self.labelled or self.val else targets[:0]
        if (labels < 0).any():
            raise SSLError(f"{source} puts unlabelled images (label -1) in its labelled or validation set: the file "
                           "is damaged; make a new split.")

    # ---- file ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "dataset": self.dataset, "num_samples": self.num_samples,
                "num_classes": self.num_classes, "targets_sha256": self.targets_sha256, "arguments": self.arguments,
                "num_labelled": len(self.labelled), "num_val": len(self.val),
                "labelled": list(self.labelled), "val": list(self.val)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the split as JSON (the index lists on one line each); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        lists = {k: d.pop(k) for k in ("labelled", "val")}
        head = json.dumps(d, indent=2)[:-2]  # without the closing "\n}"
        body = "".join(f',\n  "{k}": {json.dumps(v)}' for k, v in lists.items())
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(head + body + "\n}\n")
        os.replace(tmp, path)  # never a half-written split
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "the label split") -> LabelSplit:
        if d.get("format") != FORMAT:
            raise SSLError(f"{source} is not a label split of ssl_lightning (no \"format\": \"{FORMAT}\"): pass a "
                           "file written by make_label_split / SemiSupervisedDataModule (label_split.json of a run).")
        if d.get("version") != VERSION:
            raise SSLError(f"{source} has version {d.get('version')}; this ssl_lightning reads version {VERSION}: "
                           "make a new split.")
        split = cls(tuple(int(i) for i in d["labelled"]), tuple(int(i) for i in d["val"]), int(d["num_samples"]),
                    int(d["num_classes"]), str(d["targets_sha256"]), str(d.get("dataset", "")),
                    dict(d.get("arguments", {})))
        everything = split.labelled + split.val
        if any(i < 0 or i >= split.num_samples for i in everything) or len(set(everything)) != len(everything):
            raise SSLError(f"{source} has indices out of range or shared by the labelled and validation sets: the "
                           "file is damaged; make a new split.")
        return split

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelSplit:
        path = Path(path)
        if not path.is_file():
            raise SSLError(f"Label split file {path} does not exist: pass the label_split.json of an earlier run "
                           "(or a file saved by LabelSplit.save), or leave data.label_split unset to make a new split.")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SSLError(f"Label split file {path} is not valid JSON ({e}): pass a file saved by "
                           "LabelSplit.save.") from None
        return cls.from_dict(d, source=f"Label split {path}")


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    return f"class {c} ({class_names[c]!r})" if class_names and c < len(class_names) else f"class {c}"


def make_label_split(targets: torch.Tensor | Sequence[int], num_labels: int | None = None,
                     per_class: int | None = None, num_val: int = 0, seed: int = 0,
                     num_classes: int | None = None, dataset: str = "",
                     class_names: Sequence[str] | None = None) -> LabelSplit:
    """A stratified, seeded split of a labelled training set.

    Args:
        targets: the class of every training image (-1 = unlabelled: never labelled nor validation).
        num_labels: labels in total, the same number in every class (must be a multiple of the class count).
        per_class: labels per class (give this or ``num_labels``).
        num_val: validation images carved from the remaining labelled images, stratified: ``num_val // C``
            per class and one more in ``num_val % C`` classes drawn by the seed.
        seed: the split's seed (its own: independent of the training seed).
        num_classes: the class count C (default: the largest label + 1).
        dataset, class_names: recorded in the file and named in error messages.
    """
    targets = torch.as_tensor(targets, dtype=torch.int64)
    labelled_mask = targets >= 0
    if not labelled_mask.any():
        raise SSLError(f"{dataset or 'The dataset'} has no labelled training images: semi-supervised learning needs "
                       "labels (a dataset with classes, e.g. image folders with class sub-folders).")
    C = int(num_classes) if num_classes else int(targets.max()) + 1
    if (num_labels is None) == (per_class is None):
        raise SSLError("Give exactly one of num_labels (labels in total, e.g. 250) and labels_per_class (e.g. 25); "
                       f"got num_labels={num_labels}, labels_per_class={per_class}.")
    if num_labels is not None:
        if num_labels <= 0:
            raise SSLError(f"num_labels={num_labels}: a semi-supervised split needs at least one label per class: "
                           f"use num_labels >= {C} (a multiple of the {C} classes) or labels_per_class >= 1.")
        if num_labels % C:
            low, high = (num_labels // C) * C, (num_labels // C + 1) * C
            hint = f"num_labels={low} or {high}" if low > 0 else f"num_labels={high}"
            raise SSLError(f"num_labels={num_labels} is not a multiple of the {C} classes: the split is stratified "
                           f"(the same number of labels in every class), so use {hint} "
                           f"(or labels_per_class={max(1, num_labels // C)}).")
        per_class = num_labels // C
    assert per_class is not None
    if per_class <= 0:
        raise SSLError(f"labels_per_class={per_class}: a semi-supervised split needs at least one label per class: "
                       "use labels_per_class >= 1.")
    if num_val < 0:
        raise SSLError(f"num_val={num_val}: use num_val >= 0 validation images (0 = no validation split).")
    available = int(labelled_mask.sum())
    if per_class * C + num_val > available:
        raise SSLError(f"{per_class * C} labels ({per_class} per class) + {num_val} validation images exceed the "
                       f"{available} labelled training images of {dataset or 'the dataset'}: lower num_labels / "
                       "labels_per_class or num_val.")

    g = torch.Generator().manual_seed(int(seed))
    val_counts = [num_val // C] * C
    for c in torch.randperm(C, generator=g)[: num_val % C].tolist():
        val_counts[c] += 1
    labelled: list[int] = []
    val: list[int] = []
    for c in range(C):
        members = (targets == c).nonzero().squeeze(1)
        need = per_class + val_counts[c]
        if len(members) < need:
            what = f"{per_class} labels" + (f" + {val_counts[c]} validation images" if val_counts[c] else "")
            raise SSLError(f"{what} per class are asked for, but {_class_name(c, class_names)} has only "
                           f"{len(members)} training images: lower labels_per_class / num_labels"
                           f"{' or num_val' if val_counts[c] else ''} (at most {len(members) - val_counts[c]} "
                           f"labels per class fit in {_class_name(c, class_names)}).")
        members = members[torch.randperm(len(members), generator=g)]
        val += members[: val_counts[c]].tolist()
        labelled += members[val_counts[c]: need].tolist()
    arguments = {"num_labels": num_labels, "labels_per_class": per_class if num_labels is None else None,
                 "num_val": num_val, "seed": int(seed)}
    return LabelSplit(tuple(sorted(labelled)), tuple(sorted(val)), len(targets), C, targets_checksum(targets),
                      dataset, arguments)
