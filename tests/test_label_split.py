"""Label splits: stratified counts, seeded reproducibility and nesting, the JSON round trip, refusal on
another dataset, and every error message."""
from __future__ import annotations

import json

import pytest
import torch

from ssl_lightning.data.label_split import LabelSplit, make_label_split, targets_checksum
from ssl_lightning.registry import SSLError

NUM_CLASSES = 10
CLASS_NAMES = [f"name_{c}" for c in range(NUM_CLASSES)]


def make_targets(seed: int = 0, unlabelled: int = 0) -> torch.Tensor:
    """Imbalanced classes (30 + 3c images of class c), shuffled, then ``unlabelled`` images of label -1."""
    labels = torch.cat([torch.full((30 + 3 * c,), c) for c in range(NUM_CLASSES)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    return torch.cat([labels, torch.full((unlabelled,), -1)])


def per_class_counts(targets: torch.Tensor, indices) -> list[int]:
    return torch.bincount(targets[list(indices)], minlength=NUM_CLASSES).tolist()


def test_stratified_counts_and_disjoint_parts():
    targets = make_targets(unlabelled=17)
    split = make_label_split(targets, per_class=5, num_val=23, seed=3)
    assert per_class_counts(targets, split.labelled) == [5] * NUM_CLASSES
    val_counts = per_class_counts(targets, split.val)
    assert sum(val_counts) == 23 and sorted(set(val_counts)) == [2, 3]  # 23 // 10 each, 3 classes one more
    labelled, val, rest = set(split.labelled), set(split.val), set(split.rest())
    assert not labelled & val and not (labelled | val) & rest
    assert labelled | val | rest == set(range(len(targets)))
    assert all(int(targets[i]) >= 0 for i in labelled | val)  # unlabelled images only ever in the rest
    assert set(range(len(targets) - 17, len(targets))) <= rest
    assert split.num_samples == len(targets) and split.num_classes == NUM_CLASSES and split.num_labels == 50
    total = make_label_split(targets, num_labels=40, num_val=0)
    assert per_class_counts(targets, total.labelled) == [4] * NUM_CLASSES and total.val == ()


def test_seeded_reproducible_and_nested():
    targets = make_targets()
    a, b = make_label_split(targets, per_class=4, num_val=20, seed=1), make_label_split(targets, per_class=4,
                                                                                          num_val=20, seed=1)
    assert a == b
    c = make_label_split(targets, per_class=4, num_val=20, seed=2)
    assert c.labelled != a.labelled and c.val != a.val
    more = make_label_split(targets, per_class=9, num_val=20, seed=1)
    assert set(a.labelled) < set(more.labelled)  # the 40-label set lies inside the 90-label one
    assert more.val == a.val  # the validation set does not depend on the number of labels


def test_save_load_round_trip(tmp_path):
    targets = make_targets(unlabelled=5)
    split = make_label_split(targets, num_labels=30, num_val=15, seed=4, dataset="toy")
    path = split.save(tmp_path / "run" / "label_split.json")
    loaded = LabelSplit.load(path)
    assert loaded == split
    loaded.check(targets, "toy")
    d = json.loads(path.read_text())
    assert d["format"] == "ssl_lightning.label_split" and d["version"] == 1
    assert d["dataset"] == "toy" and d["num_samples"] == len(targets) and d["num_classes"] == NUM_CLASSES
    assert d["targets_sha256"] == targets_checksum(targets)
    assert d["arguments"] == {"num_labels": 30, "labels_per_class": None, "num_val": 15, "seed": 4}
    assert d["labelled"] == list(split.labelled) and d["val"] == list(split.val)
    assert len(path.read_text().splitlines()) < 20  # small: the index lists stay on one line each


def test_refused_on_another_dataset(tmp_path):
    targets = make_targets()
    path = make_label_split(targets, per_class=2, num_val=0, dataset="toy").save(tmp_path / "split.json")
    split = LabelSplit.load(path)
    with pytest.raises(SSLError, match=r"made for toy \(435 training images\), not for other \(434 training images\)"):
        split.check(targets[:-1], "other")
    with pytest.raises(SSLError, match="whose labels differ"):
        split.check(make_targets(seed=1), "toy")  # same size and classes, another order


@pytest.mark.parametrize("kwargs,message", [
    ({"per_class": 40}, r"40 labels per class are asked for, but class 0 \('name_0'\) has only 30 training images"),
    ({"per_class": 30, "num_val": 10}, r"30 labels \+ 1 validation images per class .* class 0 \('name_0'\) has only 30"),
    ({"num_labels": 0}, r"num_labels=0: a semi-supervised split needs at least one label per class"),
    ({"per_class": 0}, r"labels_per_class=0: .* at least one label per class"),
    ({"num_labels": 45}, r"num_labels=45 is not a multiple of the 10 classes: .* use num_labels=40 or 50"),
    ({"num_labels": 7}, r"num_labels=7 is not a multiple of the 10 classes: .* use num_labels=10 "),
    ({"per_class": 30, "num_val": 200}, r"300 labels \(30 per class\) \+ 200 validation images exceed the 435"),
    ({}, r"Give exactly one of num_labels .* and labels_per_class"),
    ({"num_labels": 10, "per_class": 1}, r"Give exactly one of num_labels"),
    ({"per_class": 1, "num_val": -1}, r"num_val=-1: use num_val >= 0"),
])
def test_error_messages(kwargs, message):
    with pytest.raises(SSLError, match=message):
        make_label_split(make_targets(), class_names=CLASS_NAMES, **kwargs)


def test_no_labels_and_damaged_files(tmp_path):
    with pytest.raises(SSLError, match="has no labelled training images"):
        make_label_split(torch.full((20,), -1), per_class=1)
    with pytest.raises(SSLError, match="does not exist: pass the label_split.json of an earlier run"):
        LabelSplit.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SSLError, match="is not valid JSON"):
        LabelSplit.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"labelled": [1]}))
    with pytest.raises(SSLError, match="is not a label split of ssl_lightning"):
        LabelSplit.load(tmp_path / "other.json")
    d = make_label_split(make_targets(), per_class=1, num_val=0).to_dict()
    d["val"] = [d["labelled"][0]]
    (tmp_path / "overlap.json").write_text(json.dumps(d))
    with pytest.raises(SSLError, match="shared by the labelled and validation sets"):
        LabelSplit.load(tmp_path / "overlap.json")
