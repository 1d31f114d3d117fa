"""SemiSupervisedDataModule and its pieces: batch layout, indices, the cycling labelled stream, views that do
not depend on loader workers or process count, weak / strong pipelines, the split in the run directory, a
short Lightning fit, and the errors for impossible requests."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).parent))
import standins  # noqa: E402

from ssl_lightning.data import SemiSupervisedDataModule, StrongAugment, WeakAugment  # noqa: E402
from ssl_lightning.data.cycle_sampler import CyclingSampler  # noqa: E402
from ssl_lightning.data.datasets import FASHION_MNIST_DEB  # noqa: E402
from ssl_lightning.data.label_split import LabelSplit  # noqa: E402
from ssl_lightning.data.semi import SPLIT_FILENAME, dataset_targets  # noqa: E402
from ssl_lightning.data.semi_views import GRAY, Cutout, strong_transform, weak_transform  # noqa: E402
from ssl_lightning.registry import SSLError  # noqa: E402

HAVE_FMNIST = (Path(FASHION_MNIST_DEB) / "train-images-idx3-ubyte.gz").is_file()


def make_dm(**kwargs) -> SemiSupervisedDataModule:
    options = kwargs.pop("dataset_options", {"size": 120})
    defaults = dict(dataset="synthetic", labels_per_class=2, num_val=10, batch_size=4, mu=3, num_workers=0,
                    pin_memory=False, eval_batch_size=16)
    return SemiSupervisedDataModule(dataset_options=options, **{**defaults, **kwargs})


def batches(dm: SemiSupervisedDataModule, epoch: int = 0, n: int | None = None) -> list[dict]:
    loader = dm.train_dataloader()
    for dl in loader.flattened:
        dl.sampler.set_epoch(epoch)
    out = []
    for batch, _, _ in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


# ---- batches ------------------------------------------------------------------------------------------------
def test_batch_layout_and_indices():
    dm = make_dm()
    dm.setup("fit")
    assert (dm.num_labelled, dm.num_unlabelled, len(dm.val_set)) == (20, 110, 10)  # "all": 120 - 10 validation
    assert dm.steps() == 110 // 12  # one pass over the larger (unlabelled) stream
    first = batches(dm, n=1)[0]
    x, y, idx = first["labelled"]
    views, uidx = first["unlabelled"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.min() < 0  # normalised
    assert len(views) == 2 and all(v.shape == (12, 3, 32, 32) for v in views)  # mu x B per view
    targets = dataset_targets(dm.labelled_set.base)
    assert torch.equal(y, targets[idx])  # idx = positions in labelled_set, whose labels these are
    assert all(0 <= i < dm.num_labelled for i in idx.tolist())
    assert uidx.dtype == torch.long and all(0 <= i < dm.num_unlabelled for i in uidx.tolist())
    assert len(set(uidx.tolist())) == 12
    assert not torch.equal(views[0], views[1])  # weak and strong views of the same images differ
    train_targets = dataset_targets(dm.labelled_set.base.dataset)
    assert torch.equal(train_targets[[dm.labelled_indices[i] for i in idx.tolist()]], y)


def test_labelled_stream_cycles_with_fresh_shuffles_and_views():
    dm = make_dm()
    dm.setup("fit")
    epoch = batches(dm)
    assert len(epoch) == dm.steps() == 9
    labelled = torch.cat([b["labelled"][2] for b in epoch]).tolist()  # 36 = 20 + 16 draws from 20 labels
    assert sorted(labelled[:20]) == list(range(20)) and len(set(labelled[20:])) == 16
    unlabelled = torch.cat([b["unlabelled"][1] for b in epoch]).tolist()
    assert len(set(unlabelled)) == len(unlabelled) == 108  # no repeats within one pass
    keys = list(dm.train_dataloader().flattened[0].sampler)
    again = {i: s for i, s in keys[20:]}
    i, s0 = next((i, s) for i, s in keys[:20] if i in again)
    x0, _, _ = dm.labelled_set[(i, s0)]
    x1, _, _ = dm.labelled_set[(i, again[i])]
    assert s0 != again[i] and not torch.equal(x0, x1)  # a second pass over a label draws a new view
    other = batches(dm, epoch=1, n=1)[0]
    assert not torch.equal(other["labelled"][2], epoch[0]["labelled"][2])  # each epoch a new order


def test_unlabelled_all_and_rest():
    everything = make_dm(unlabelled="all")
    everything.setup("fit")
    rest = make_dm(unlabelled="rest")
    rest.setup("fit")
    val, lab = set(everything.split.val), set(everything.split.labelled)
    assert set(everything.unlabelled_indices) == set(range(120)) - val  # labelled images included (FixMatch)
    assert set(rest.unlabelled_indices) == set(range(120)) - val - lab
    assert rest.split == everything.split


def test_views_do_not_depend_on_workers():
    runs = {}
    for workers in (0, 2):
        dm = make_dm(num_workers=workers, labelled_workers=workers, steps_per_epoch=2)
        dm.setup("fit")
        runs[workers] = batches(dm, epoch=1)
    assert len(runs[0]) == 2 and same(runs[0], runs[2])


def test_processes_together_see_the_one_process_global_batch():
    """2 processes x batch 4 see, step by step, the samples and seeds of 1 process x batch 8 (cycling included)."""
    ds = list(range(10))
    steps, b, w = 5, 4, 2
    single = list(CyclingSampler(ds, steps * w * b, seed=3, stream=1, num_replicas=1, rank=0))
    ranks = [list(CyclingSampler(ds, steps * b, seed=3, stream=1, num_replicas=w, rank=r)) for r in range(w)]
    for step in range(steps):
        together = sorted(k for r in range(w) for k in ranks[r][step * b:(step + 1) * b])
        assert together == sorted(single[step * w * b:(step + 1) * w * b])
    assert sorted(i for i, _ in single[:10]) == list(range(10))  # each pass a permutation
    seeds = {}
    for i, s in single:
        seeds.setdefault(i, set()).add(s)
    assert all(len(v) == 4 for v in seeds.values())  # 4 passes, 4 different seeds per sample
    labelled = list(CyclingSampler(ds, 10, seed=3, stream=0, num_replicas=1, rank=0))
    assert [i for i, _ in labelled] != [i for i, _ in single[:10]]  # streams are shuffled independently


def test_mixmatch_views_and_supervised_only():
    mixmatch = make_dm(mu=1, unlabelled_views=["weak"], k_unlabelled=2)
    views, _ = batches(mixmatch, n=1)[0]["unlabelled"]
    assert len(views) == 2 and views[0].shape == (4, 3, 32, 32) and not torch.equal(views[0], views[1])
    supervised = make_dm(mu=0)
    epoch = batches(supervised)
    assert all(set(b) == {"labelled"} for b in epoch) and len(epoch) == 20 // 4


# ---- weak and strong pipelines ------------------------------------------------------------------------------------
def test_weak_and_strong_pipelines():
    strong = strong_transform(32, (0.5,) * 3, (0.25,) * 3)
    names = [type(t).__name__ for t in strong.transforms]
    assert names == ["ToImage", "RandomHorizontalFlip", "RandomCrop", "RandomApply", "RandomApply", "Cutout",
                     "ToDtype", "Normalize"]
    crop = strong.transforms[2]
    assert crop.padding == [4, 4, 4, 4] and crop.padding_mode == "reflect"
    apply = strong.transforms[3]
    assert apply.p == 0.5
    choice = apply.transforms[0]
    assert isinstance(choice, v2.RandomChoice)
    assert [(t.num_ops, t.magnitude, t.num_magnitude_bins, t.fill) for t in choice.transforms] == \
           [(1, m, 11, GRAY) for m in range(1, 10)]  # magnitudes 1..9 of 0..10; uncovered pixels gray
    fixed = strong_transform(32, (0.5,), (0.25,), strong=StrongAugment(random_magnitude=False, op_probability=1.0))
    assert [(t.magnitude, t.num_magnitude_bins) for t in fixed.transforms[3:5]] == [(10, 11), (10, 11)]
    weak = weak_transform(96, (0.5,), (0.25,))
    assert [type(t).__name__ for t in weak.transforms] == ["ToImage", "RandomHorizontalFlip", "RandomCrop", "ToDtype",
                                                          "Normalize"]
    assert weak.transforms[2].padding == [12, 12, 12, 12]  # 12.5% of 96


def test_every_rand_augment_op_runs_on_grey_and_colour_images(monkeypatch):
    drawn: list[str] = []
    draw = v2.RandAugment._get_random_item

    def spy(self, space):  # records which op RandAugment drew (torchvision 0.29's private hook)
        key, value = draw(self, space)
        drawn.append(key)
        return key, value

    monkeypatch.setattr(v2.RandAugment, "_get_random_item", spy)
    g = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        drawn.clear()
        pipeline = strong_transform(28, (0.5,) * channels, (0.25,) * channels, strong=StrongAugment(op_probability=1.0))
        for k in range(100):
            image = torch.randint(0, 256, (channels, 28, 28), dtype=torch.uint8, generator=g)
            torch.manual_seed(k)
            out = pipeline(image)
            assert out.shape == (channels, 28, 28) and out.dtype == torch.float32 and torch.isfinite(out).all()
            torch.manual_seed(k)
            assert torch.equal(pipeline(image), out)  # seeded: reproducible
        assert set(drawn) == set(v2.RandAugment._AUGMENTATION_SPACE), channels  # all 14 ops ran


def test_cutout_is_a_gray_square_of_half_the_side_clipped_at_the_border():
    zeros = torch.zeros(3, 32, 32, dtype=torch.uint8)
    cut = Cutout(0.5)
    areas = []
    for seed in range(200):
        torch.manual_seed(seed)
        out = cut(zeros)
        gray = (out == GRAY).all(0)
        rows, cols = gray.any(1).nonzero().squeeze(1), gray.any(0).nonzero().squeeze(1)
        assert int(gray.sum()) == len(rows) * len(cols)  # one axis-aligned rectangle
        assert len(rows) <= 16 and len(cols) <= 16
        areas.append(int(gray.sum()))
    assert max(areas) == 256 and min(areas) < 256  # 16 x 16 inside, smaller where the border clips it
    assert torch.equal(zeros, torch.zeros_like(zeros))  # the input is left alone
    with pytest.raises(SSLError, match="magnitude"):
        strong_transform(32, (0.5,), (0.25,), strong=StrongAugment(magnitude=11))
    with pytest.raises(SSLError, match="translate"):
        weak_transform(32, (0.5,), (0.25,), WeakAugment(translate=1.5))


# ---- the split in the run directory ------------------------------------------------------------------------------
def test_split_written_to_the_run_dir_and_reloaded(tmp_path):
    trainer = L.Trainer(default_root_dir=tmp_path / "run", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    dm = make_dm()
    dm.trainer = trainer
    dm.setup("fit")
    path = tmp_path / "run" / SPLIT_FILENAME
    assert LabelSplit.load(path) == dm.split
    again = make_dm(labels_per_class=None, num_val=None, label_split=str(path))
    again.setup("fit")
    assert again.split == dm.split and again.labelled_indices == dm.labelled_indices
    assert again.unlabelled_indices == dm.unlabelled_indices
    with pytest.raises(SSLError, match=r"data.labels_per_class=3, but the split in .* has 2: leave"):
        make_dm(labels_per_class=3, label_split=str(path)).setup("fit")
    with pytest.raises(SSLError, match="whose labels differ"):
        make_dm(labels_per_class=None, num_val=None, label_split=str(path),
                dataset_options={"size": 120, "seed": 5}).setup("fit")
    other = make_dm(split_seed=9)  # a different split into the same run directory
    other.trainer = trainer
    with pytest.raises(SSLError, match="holds another label split"):
        other.setup("fit")
    dm.setup("fit")  # the same split again (a resumed run): accepted


class TinyClassifier(L.LightningModule):
    """A linear classifier on the labelled images plus a zero-weight term on the unlabelled views, recording
    what it was fed."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 10)
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.val_sizes: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        x, y, idx = batch["labelled"]
        views, uidx = batch["unlabelled"]
        self.seen.setdefault(self.current_epoch, []).append(idx)
        loss = F.cross_entropy(self.linear(x.flatten(1)), y)
        return loss + 0.0 * self.linear(views[1].flatten(1)).mean()

    def on_validation_epoch_start(self):
        self.val_sizes = {}  # the sizes of the last validation

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        images, labels = batch
        self.val_sizes[dataloader_idx] = self.val_sizes.get(dataloader_idx, 0) + len(labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit(tmp_path):
    dm = make_dm(dataset_options={"size": 60, "image_size": 8}, labels_per_class=1, num_val=10, mu=2)
    model = TinyClassifier()
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert (tmp_path / SPLIT_FILENAME).is_file()
    assert dm.eval_names == ["val", "test"] and model.val_sizes == {0: 10, 1: 60}
    steps = dm.steps()  # max(10 // 4, 50 // 8) = 6
    assert steps == 6 and [len(model.seen[e]) for e in (0, 1)] == [steps, steps]
    assert not torch.equal(torch.cat(model.seen[0]), torch.cat(model.seen[1]))  # Lightning set the epoch


# ---- impossible requests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"labels_per_class": 15, "num_val": 5, "unlabelled": "rest", "dataset_options": {"size": 20, "num_classes": 1}},
     r'No unlabelled images are left with data.unlabelled="rest" .* data.mu=3: use data.unlabelled="all"'),
    ({"mu": -1}, r"data.mu=-1: the ratio of unlabelled to labelled images per step must be >= 0"),
    ({"labels_per_class": None}, r"No labelled subset given: set data.num_labels"),
    ({"num_labels": 20}, r"Both data.num_labels=20 and data.labels_per_class=2 are set"),
    ({"num_labels": 25, "labels_per_class": None}, r"num_labels=25 is not a multiple of the 10 classes"),
    ({"labels_per_class": 0}, r"labels_per_class=0: a semi-supervised split needs at least one label per class"),
    ({"unlabelled_views": ["weak", "medium"]}, r'data.unlabelled_views=\[.weak., .medium.\]: give a non-empty list'),
    ({"k_unlabelled": 0}, r"data.k_unlabelled=0: use K >= 1"),
    ({"unlabelled": "some"}, r'data.unlabelled=.some.: use "all"'),
])
def test_impossible_requests(kwargs, message):
    with pytest.raises(SSLError, match=message):
        make_dm(**kwargs).setup("fit")


def test_more_labels_per_class_than_exist_names_the_class():
    with pytest.raises(SSLError, match=r"class \d+ \('class_\d+'\) has only \d+ training images"):
        make_dm(labels_per_class=12, num_val=0).setup("fit")


# ---- real datasets --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DEB}")
def test_fashion_mnist_subset():
    dm = SemiSupervisedDataModule("fashion_mnist", train_subset=1000, labels_per_class=10, num_val=100, batch_size=8,
                                  mu=2, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert (dm.num_labelled, dm.num_unlabelled, len(dm.val_set), len(dm.test_set)) == (100, 900, 100, 10000)
    batch = batches(dm, n=1)[0]
    x, y, _ = batch["labelled"]
    views, _ = batch["unlabelled"]
    assert x.shape == (8, 1, 28, 28) and [v.shape for v in views] == [(16, 1, 28, 28)] * 2
    assert dm.split.dataset == "fashion_mnist" and dm.split.num_samples == 1000


def test_image_folders_are_resized_to_the_training_size(tmp_path):
    root = standins.write_image_folder(tmp_path / "folders")  # 4 classes x 6 images of varying sizes (PIL)
    dm = SemiSupervisedDataModule("image_folder", root=str(root), labels_per_class=2, num_val=4, image_size=32,
                                  batch_size=2, mu=2, num_workers=0, pin_memory=False)
    dm.setup("fit")
    batch = batches(dm, n=1)[0]
    assert batch["labelled"][0].shape == (2, 3, 32, 32)
    assert [v.shape for v in batch["unlabelled"][0]] == [(4, 3, 32, 32)] * 2
    assert dm.eval_names == ["val", "test"] and next(iter(dm.val_dataloader()[1]))[0].shape[1:] == (3, 32, 32)


def test_configurable_from_the_command_line_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SemiSupervisedDataModule, "data")
    cfg = parser.parse_args(["--data.dataset=synthetic", "--data.num_labels=40", "--data.unlabelled_views=[weak]",
                             "--data.k_unlabelled=2", "--data.strong.magnitude=8", "--data.weak.translate=0.25"])
    dm = parser.instantiate_classes(cfg).data
    assert dm.num_labels == 40 and dm.unlabelled_views == ["weak"] and dm.k_unlabelled == 2
    assert dm.strong == StrongAugment(magnitude=8) and dm.weak == WeakAugment(translate=0.25)


def test_stl10_unlabelled_split_joins_the_stream(tmp_path):
    root = standins.write_stl10(tmp_path / "stl", n_train=100, n_unlabeled=30, n_test=10)
    common = dict(dataset="stl10", root=str(root), labels_per_class=1, num_val=10, batch_size=2, mu=1,
                  num_workers=0, pin_memory=False)
    everything = SemiSupervisedDataModule(unlabelled="all", **common)
    everything.setup("fit")
    rest = SemiSupervisedDataModule(unlabelled="rest", **common)
    rest.setup("fit")
    assert (everything.num_unlabelled, rest.num_unlabelled) == (130 - 10, 130 - 10 - 10)
    extra = [i for i in everything.unlabelled_indices if i >= 100]
    assert extra == list(range(100, 130))  # STL-10's unlabelled images, after the training images
    pool_targets = dataset_targets(everything.unlabelled_set.base)
    assert (pool_targets[-30:] == -1).all() and (pool_targets[:-30] >= 0).all()
    arrays = np.load(root / "stl10_arrays.npz")
    image, _ = everything.unlabelled_set.base[len(everything.unlabelled_indices) - 1]
    assert torch.equal(image, torch.from_numpy(arrays["unlabeled_X"][29]))
    views, _ = batches(everything, n=1)[0]["unlabelled"]
    assert views[0].shape == (2, 3, 96, 96)
