"""Data paths: every registered dataset through SSLDataModule (real Fashion-MNIST from Debian's package,
generated stand-ins for the others), view presets, evaluation loaders and reproducibility."""
from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).parent))
import standins  # noqa: E402

from ssl_lightning import SSLDataModule, ViewConfig  # noqa: E402
from ssl_lightning.data import view_preset  # noqa: E402
from ssl_lightning.data.datasets import FASHION_MNIST_DEB  # noqa: E402
from ssl_lightning.data.sampler import sample_seed  # noqa: E402

FMNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz"]
HAVE_FMNIST = all((Path(FASHION_MNIST_DEB) / f).is_file() for f in FMNIST_FILES)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DEB} (apt-get install dataset-fashion-mnist)")

N_STL_TRAIN, N_STL_UNLABELED, N_STL_TEST = 20, 30, 10
CLASS_LIST = standins.FAKE_WNIDS[:3]  # the class list leaves out FAKE_WNIDS[3] and the extra folder
EXTRA_CLASS = "n09999999"


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("standins")
    standins.write_cifar10(base / "cifar")
    standins.write_cifar100(base / "cifar")
    standins.write_stl10(base / "stl", N_STL_TRAIN, N_STL_UNLABELED, N_STL_TEST)
    standins.write_image_folder(base / "imagenet", standins.FAKE_WNIDS, extra_classes=[EXTRA_CLASS])
    standins.write_class_list(base / "classes.txt", CLASS_LIST)
    standins.write_flat_folder(base / "flat", n=12)
    standins.write_fashion_mnist(base / "fmnist_tv" / "FashionMNIST" / "raw", gz=False)
    return {"cifar": base / "cifar", "stl": base / "stl", "imagenet": base / "imagenet",
            "class_list": base / "classes.txt", "flat": base / "flat", "fmnist_tv": base / "fmnist_tv"}


# name -> (dataset, root key (None: the default root), dataset_options, channels, size, eval size, num_classes,
#          has unlabelled training images)
CASES = {
    "fashion_mnist": ("fashion_mnist", None, {}, 1, 28, 28, 10, False),
    "cifar10": ("cifar10", "cifar", {}, 3, 32, 32, 10, False),
    "cifar100": ("cifar100", "cifar", {}, 3, 32, 32, 100, False),
    "stl10": ("stl10", "stl", {}, 3, 96, 96, 10, True),
    "imagenet100_class_list": ("imagenet100", "imagenet", {"class_list": "class_list"}, 3, 224, 224, 3, False),
    # image folders are sized from their images (shorter sides 32-40 px: 32); ImageNet's recipe stays 224
    "image_folder": ("image_folder", "imagenet", {}, 3, 32, 32, 5, False),
    "image_folder_flat": ("image_folder", "flat", {}, 3, 32, 32, 0, True),
    "synthetic": ("synthetic", None, {"size": 48}, 3, 32, 32, 10, False),
}


def make_dm(case: str, roots: dict[str, Path], **kwargs) -> SSLDataModule:
    dataset, root_key, options, *_ = CASES[case]
    if dataset == "fashion_mnist" and not HAVE_FMNIST:
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DEB} (apt-get install dataset-fashion-mnist)")
    options = {k: str(roots[v]) if k == "class_list" else v for k, v in options.items()}
    kwargs = {"batch_size": 4, "num_workers": 0, "pin_memory": False, "eval_batch_size": 8, **kwargs}
    return SSLDataModule(dataset=dataset, root=str(roots[root_key]) if root_key else None,
                         dataset_options=options, **kwargs)


def first_batch(dm: SSLDataModule):
    return next(iter(dm.train_dataloader()))


# ---- training batches: every dataset x every preset -----------------------------------------------------
@pytest.mark.parametrize("preset", ["simclr", "byol", "multicrop"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_batch(case, preset, roots):
    _, _, _, channels, size, _, _, unlabelled = CASES[case]
    num_local = 2
    dm = make_dm(case, roots, views=preset, num_local_crops=num_local)
    dm.setup("fit")
    views, labels, indices = first_batch(dm)

    assert isinstance(views, list)
    assert len(views) == (2 + num_local if preset == "multicrop" else 2)
    for k, v in enumerate(views):
        assert v.dtype == torch.float32
        expected = size if k < 2 else max(8, round(size * 96 / 224))
        assert v.shape == (4, channels, expected, expected), (k, v.shape)
        assert torch.isfinite(v).all()
    if preset == "multicrop":
        assert all(v.shape[-1] < size for v in views[2:])
    assert views[0].min() < 0  # normalised, not raw pixels

    assert labels.dtype == torch.long and labels.shape == (4,)
    assert indices.dtype == torch.long and indices.shape == (4,)
    assert len(set(indices.tolist())) == 4
    assert all(0 <= i < len(dm.pretrain_set) for i in indices.tolist())
    base = dm.pretrain_set.base
    assert labels.tolist() == [base[i][1] for i in indices.tolist()]  # indices index the pretraining set
    if case == "image_folder_flat":
        assert (labels == -1).all()
    elif not unlabelled:
        assert (labels >= 0).all() and (labels < dm.num_classes).all()


@pytest.mark.parametrize("case", list(CASES))
def test_properties_and_val_loaders(case, roots):
    _, _, _, channels, _, eval_size, num_classes, _ = CASES[case]
    dm = make_dm(case, roots)
    assert dm.in_channels == channels
    assert dm.num_classes == num_classes
    assert len(dm.mean) == len(dm.std) == channels
    dm.setup("fit")
    loaders = dm.val_dataloader()
    if num_classes == 0:
        assert loaders == [] and dm.eval_set is None  # unlabelled: no probe, no kNN
        return
    assert len(loaders) == 2
    for loader in loaders:
        images, labels = next(iter(loader))
        assert images.dtype == torch.float32
        assert images.shape[1:] == (channels, eval_size, eval_size)
        assert labels.shape == images.shape[:1] and labels.dtype == torch.long
        assert (labels >= 0).all() and (labels < num_classes).all()  # the kNN bank is labelled only
        again, _ = next(iter(loader))
        assert torch.equal(images, again)  # un-augmented


# ---- per-dataset specifics ---------------------------------------------------------------------------------
@needs_fmnist
def test_fashion_mnist_real_files():
    dm = SSLDataModule(dataset="fashion_mnist", batch_size=8, num_workers=0, pin_memory=False)
    assert dm.root == FASHION_MNIST_DEB
    assert (dm.num_classes, dm.in_channels) == (10, 1)
    dm.setup("fit")
    assert len(dm.pretrain_set) == 60000 and len(dm.eval_set) == 60000 and len(dm.val_set) == 10000
    assert dm.pretrain_set.base.images.shape == (60000, 1, 28, 28)
    assert sorted(dm.pretrain_set.base.targets.unique().tolist()) == list(range(10))
    assert dm.pretrain_set.base.classes[0] == "T-shirt/top"


def test_fashion_mnist_torchvision_layout(roots):
    """Uncompressed idx files under FashionMNIST/raw (what torchvision's download leaves) load too."""
    dm = SSLDataModule(dataset="fashion_mnist", root=str(roots["fmnist_tv"]), batch_size=8, num_workers=0,
                       pin_memory=False)
    dm.setup("fit")
    assert len(dm.pretrain_set) == 32 and len(dm.val_set) == 16
    views, labels, _ = first_batch(dm)
    assert views[0].shape == (8, 1, 28, 28)


def test_cifar_pixels_and_labels(roots):
    import pickle

    with open(roots["cifar"] / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    dm = make_dm("cifar10", roots)
    dm.setup("fit")
    base = dm.pretrain_set.base
    assert len(base) == 40 and len(dm.val_set) == 10
    assert base.classes[0] == "airplane"
    image, label = base[8]  # first image of data_batch_2
    assert torch.equal(image, torch.from_numpy(batch["data"][0].reshape(3, 32, 32)))
    assert label == batch["labels"][0]
    dm100 = make_dm("cifar100", roots)
    dm100.setup("fit")
    assert len(dm100.pretrain_set) == 40 and dm100.pretrain_set.base.classes[:2] == ["fine_0", "fine_1"]


def test_stl10_pretrain_is_train_plus_unlabeled(roots):
    arrays = np.load(roots["stl"] / "stl10_arrays.npz")
    dm = make_dm("stl10", roots, batch_size=10)
    dm.setup("fit")
    base = dm.pretrain_set.base
    assert len(base) == N_STL_TRAIN + N_STL_UNLABELED
    assert base.targets[:N_STL_TRAIN].tolist() == arrays["train_y"].tolist()  # 1-based on disk -> 0-based
    assert (base.targets[N_STL_TRAIN:] == -1).all()
    assert torch.equal(base.images[3], torch.from_numpy(arrays["train_X"][3]))
    assert torch.equal(base.images[N_STL_TRAIN + 5], torch.from_numpy(arrays["unlabeled_X"][5]))
    # the evaluation sets are the labelled train split (kNN bank) and the test split
    assert len(dm.eval_set) == N_STL_TRAIN and len(dm.val_set) == N_STL_TEST
    labels = torch.cat([batch[1] for batch in dm.train_dataloader()])
    assert len(labels) == N_STL_TRAIN + N_STL_UNLABELED and int((labels == -1).sum()) == N_STL_UNLABELED


def test_class_list_selects_and_orders_classes(roots):
    dm = make_dm("imagenet100_class_list", roots)
    dm.setup("fit")
    base = dm.pretrain_set.base
    assert base.classes == CLASS_LIST and dm.num_classes == len(CLASS_LIST)
    assert len(base) == 6 * len(CLASS_LIST)
    for path, label in base.samples:
        assert Path(path).parent.name == CLASS_LIST[label]
    assert len(dm.val_set) == 2 * len(CLASS_LIST)
    assert dm.val_set.base.classes == CLASS_LIST


def test_image_folder_labelled_and_flat(roots):
    labelled = make_dm("image_folder", roots)
    labelled.setup("fit")
    assert labelled.pretrain_set.base.classes == sorted(standins.FAKE_WNIDS + [EXTRA_CLASS])
    assert len(labelled.pretrain_set) == 6 * 5 and len(labelled.val_set) == 2 * 5
    flat = make_dm("image_folder_flat", roots)
    flat.setup("fit")
    assert len(flat.pretrain_set) == 12  # README.txt is not an image
    assert flat.num_classes == 0 and flat.val_dataloader() == []
    assert all(label == -1 for _, label in flat.pretrain_set.base.samples)


def test_synthetic_options(roots):
    dm = SSLDataModule(dataset="synthetic", batch_size=4, num_workers=0, pin_memory=False,
                       dataset_options={"size": 20, "channels": 1, "num_classes": 4, "image_size": 16})
    assert (dm.in_channels, dm.num_classes, dm.image_size) == (1, 4, 16)
    dm.setup("fit")
    views, labels, _ = first_batch(dm)
    assert views[0].shape == (4, 1, 16, 16) and labels.max() < 4


def test_subsets(roots):
    dm = make_dm("synthetic", roots, train_subset=20, eval_subset=10, val_subset=5)
    dm.setup("fit")
    assert (len(dm.pretrain_set), len(dm.eval_set), len(dm.val_set)) == (20, 10, 5)
    _, _, indices = first_batch(dm)
    assert indices.max() < 20  # positions in the (subset) pretraining set


# ---- reproducibility ---------------------------------------------------------------------------------------
def _equal_views(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", ["cifar10", "image_folder"])
def test_same_key_same_views(case, roots):
    dm = make_dm(case, roots, views="multicrop", num_local_crops=2)
    dm.setup("fit")
    ds = dm.pretrain_set
    views_a, label_a, index_a = ds[(3, 1234)]
    views_b, label_b, index_b = ds[(3, 1234)]
    assert _equal_views(views_a, views_b) and (label_a, index_a) == (label_b, index_b) == (label_a, 3)
    views_c, _, _ = ds[(3, 1235)]
    assert not any(torch.equal(x, y) for x, y in zip(views_a, views_c))
    assert not torch.equal(views_a[0], views_a[1])  # the two views of one sample differ
    # the global RNG is left alone
    state = torch.random.get_rng_state()
    ds[(4, 99)]
    assert torch.equal(state, torch.random.get_rng_state())


def test_batches_independent_of_workers(roots):
    batches = {}
    for workers in (0, 2):
        dm = make_dm("synthetic", roots, num_workers=workers, batch_size=8)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        batches[workers] = list(loader)
        del loader
    assert len(batches[0]) == len(batches[2]) == 48 // 8
    for (v0, l0, i0), (v2, l2, i2) in zip(batches[0], batches[2]):
        assert torch.equal(i0, i2) and torch.equal(l0, l2) and _equal_views(v0, v2)


def test_sampler_seeds_match_dataset_and_epoch_changes_order(roots):
    dm = make_dm("synthetic", roots, batch_size=8, seed=7)
    dm.setup("fit")
    loader = dm.train_dataloader()
    sampler = loader.sampler
    keys0 = list(sampler)
    assert sorted(i for i, _ in keys0) == list(range(48))  # one epoch = every sample once
    assert all(s == sample_seed(7, 0, i) for i, s in keys0)
    views, _, indices = next(iter(loader))
    i = int(indices[0])
    assert _equal_views([v[0] for v in views], dm.pretrain_set[(i, sample_seed(7, 0, i))][0])

    assert list(sampler) == keys0  # same epoch, same order
    sampler.set_epoch(1)
    keys1 = list(sampler)
    assert [i for i, _ in keys1] != [i for i, _ in keys0]
    seeds0, seeds1 = dict(keys0), dict(keys1)
    assert all(seeds0[i] != seeds1[i] for i in seeds0)  # new augmentations every epoch
    views1, _, indices1 = next(iter(loader))
    assert not torch.equal(indices1, indices)


def test_data_seed_changes_order(roots):
    orders = [[i for i, _ in make_dm("synthetic", roots, seed=s).train_dataloader().sampler] for s in (0, 1)]
    assert orders[0] != orders[1]


# ---- view presets ------------------------------------------------------------------------------------------
def _blur_p(pipeline: v2.Compose) -> float:
    for t in pipeline.transforms:
        if isinstance(t, v2.RandomApply) and any(isinstance(u, v2.GaussianBlur) for u in t.transforms):
            return t.p
    return 0.0


def _solarize_p(pipeline: v2.Compose) -> float:
    return next((t.p for t in pipeline.transforms if isinstance(t, v2.RandomSolarize)), 0.0)


def test_byol_preset_per_view_settings():
    first, second = view_preset("byol", 224)
    assert (first.blur, second.blur) == (1.0, 0.1)
    assert (first.solarize, second.solarize) == (0.0, 0.2)
    assert first.count == second.count == 1 and first.size == second.size == 224
    small = view_preset("byol", 32)
    assert [v.blur for v in small] == [0.0, 0.0] and [v.solarize for v in small] == [0.0, 0.2]


def test_byol_preset_in_the_pipelines(roots):
    big = make_dm("imagenet100_class_list", roots, views="byol")
    big.setup("fit")
    pipes = big.pretrain_set.transform.pipelines
    assert [_blur_p(p) for p in pipes] == [1.0, 0.1] and [_solarize_p(p) for p in pipes] == [0.0, 0.2]
    small = make_dm("cifar10", roots, views="byol")
    small.setup("fit")
    pipes = small.pretrain_set.transform.pipelines
    assert [_blur_p(p) for p in pipes] == [0.0, 0.0] and [_solarize_p(p) for p in pipes] == [0.0, 0.2]


def test_simclr_preset_strength():
    (big,), (small,) = view_preset("simclr", 224), view_preset("simclr", 32)
    assert big.count == small.count == 2
    assert (big.brightness, big.hue, big.blur) == (0.8, 0.2, 0.5)
    assert (small.brightness, small.hue, small.blur) == (0.4, 0.1, 0.0)


@pytest.mark.parametrize("size,local", [(224, 96), (96, 41), (32, 14), (16, 8)])
def test_multicrop_preset(size, local):
    views = view_preset("multicrop", size, num_local=5)
    assert [v.count for v in views] == [1, 1, 5]
    assert [v.size for v in views] == [size, size, local]
    assert views[0].scale == views[1].scale == (0.14, 1.0) and views[2].scale == (0.05, 0.14)


def test_custom_view_list_gets_dataset_size(roots):
    dm = make_dm("cifar10", roots, views=[ViewConfig(count=3), ViewConfig(size=12, count=1)])
    dm.setup("fit")
    views, _, _ = first_batch(dm)
    assert [tuple(v.shape[-2:]) for v in views] == [(32, 32)] * 3 + [(12, 12)]


# ---- image folders are sized from their images ------------------------------------------------------------------
def _folder(root: Path, size: tuple[int, int], n: int = 20) -> Path:
    """``n`` PNGs of ``size`` (width, height) in two class folders, and a val split of 2 per class."""
    for split, count in (("train", n // 2), ("val", 2)):
        for c in ("a", "b"):
            for i in range(count):
                standins.write_image(root / split / c / f"{c}_{i}.png", size, seed=i)
    return root


def _folder_dm(root: Path, **kwargs) -> SSLDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "pin_memory": False, "eval_batch_size": 8, **kwargs}
    return SSLDataModule(dataset="image_folder", root=str(root), **kwargs)


RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


@pytest.mark.parametrize("size,expected", [((32, 32), 32), ((40, 30), 28), ((300, 260), 224)])
def test_image_folder_size_from_the_data(tmp_path, caplog, recwarn, size, expected):
    """The largest common size not above the median shorter side (224 at most), printed once; the views,
    the device path's load size and the evaluation transform use it exactly as a given size."""
    import logging

    caplog.set_level(logging.INFO, logger=RANK_ZERO)
    root = _folder(tmp_path / "imgs", size)
    dm = _folder_dm(root, views="byol")
    assert caplog.records == []  # nothing is read before the size is needed
    dm.setup("fit")
    assert dm.image_size == expected
    lines = [r.getMessage() for r in caplog.records if "image_size" in r.getMessage()]
    assert lines == [f"[ssl_lightning] image_size {expected} from the data (median shorter side {min(size)} px of "
                     f"20 images); set data.image_size to override"]
    given = _folder_dm(root, views="byol", image_size=expected)
    assert dm.view_configs == given.view_configs == view_preset("byol", expected)
    views, _, _ = first_batch(dm)
    assert [v.shape[-1] for v in views] == [expected, expected]
    images, _ = next(iter(dm.val_dataloader()[1]))
    assert images.shape[-2:] == (expected, expected)
    device = _folder_dm(root, augment="device")
    assert device.load_size == round(expected / 0.875) == given.load_size
    device.setup("fit")
    assert device.pretrain_set[(0, 1)][0].shape == (3, device.load_size, device.load_size)
    assert not [w for w in recwarn if "upsample" in str(w.message)]


def test_image_folder_upsampling_warning_and_given_size(tmp_path):
    """A given image_size is kept, with a warning when crops upsample the images more than 2x."""
    root = _folder(tmp_path / "imgs", (32, 32))
    dm = _folder_dm(root, image_size=224)
    with pytest.warns(UserWarning, match=r"224 px crops upsample the images 7\.0x \(median shorter side 32 px of "
                                         r"20 images\).*data.image_size .* to about 32"):
        dm.setup("fit")
    assert dm.image_size == 224 and [v.size for v in dm.view_configs] == [224]
    views = _folder_dm(root, image_size=32, views=[ViewConfig(count=2), ViewConfig(size=96, count=1)])
    with pytest.warns(UserWarning, match="96 px crops upsample the images 3.0x"):  # view sizes count too
        views.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _folder_dm(root, image_size=64).setup("fit")  # 2x: no warning


def test_image_sides_sample_is_seeded(tmp_path):
    from ssl_lightning.data.folder import ImageFolderDataset
    from ssl_lightning.data.image_size import image_sides, size_for

    root = tmp_path / "mixed"
    for i in range(12):
        standins.write_image(root / f"{i:02d}.png", (20 + 4 * i, 100), seed=i)
    ds = ImageFolderDataset(root)
    a, b = image_sides(ds, sample=5), image_sides(ds, sample=5)
    assert a == b and a.count == 5 and a.sampled and "of 5 sampled images" in a.describe()
    assert image_sides(ds, sample=5, seed=1) != a  # another sample
    assert image_sides(ds).median == statistics.median(20 + 4 * i for i in range(12))
    assert [size_for(s) for s in (5, 8, 27, 28, 63, 64, 223, 224, 1000)] == [8, 8, 24, 28, 48, 64, 192, 224, 224]
