"""User errors: each gives one ``SSLError`` (a ValueError) whose message names the problem and the fix,
and the CLI turns it into a single ``error: ...`` line with exit code 2."""
from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).parent))
import standins  # noqa: E402

from ssl_lightning import SSLDataModule, SSLError  # noqa: E402
from ssl_lightning.backbones import BACKBONES, build_backbone  # noqa: E402
from ssl_lightning.cli import _user_message, main  # noqa: E402
from ssl_lightning.data import DATASETS  # noqa: E402
from ssl_lightning.data.folder import BadImageWarning, ImageFolderDataset  # noqa: E402
from ssl_lightning.methods import METHODS  # noqa: E402


def dm(dataset: str, root=None, **kwargs) -> SSLDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "pin_memory": False, **kwargs}
    return SSLDataModule(dataset=dataset, root=None if root is None else str(root), **kwargs)


def test_ssl_error_is_a_value_error():
    assert issubclass(SSLError, ValueError)


# ---- registries --------------------------------------------------------------------------------------------
def test_unknown_dataset_lists_registered_names():
    with pytest.raises(SSLError) as info:
        dm("nope")
    msg = str(info.value)
    assert "'nope'" in msg
    for name in DATASETS.names():
        assert name in msg
    assert "cifar10" in msg and "fashion_mnist" in msg


def test_unknown_backbone_lists_registered_names():
    with pytest.raises(SSLError) as info:
        build_backbone("nope")
    msg = str(info.value)
    assert "'nope'" in msg and "backbone" in msg
    for name in BACKBONES.names():
        assert name in msg
    assert "convnet" in msg


def test_unknown_view_preset():
    with pytest.raises(SSLError, match="simclr, byol or multicrop"):
        dm("synthetic", views="nope")


# ---- missing data ---------------------------------------------------------------------------------------------
def test_missing_fashion_mnist(tmp_path):
    module = dm("fashion_mnist", tmp_path)
    with pytest.raises(SSLError) as info:
        module.setup("fit")
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "download" in msg


@pytest.mark.parametrize("dataset,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                            ("stl10", "stl10_binary")])
def test_missing_torchvision_dataset(tmp_path, dataset, folder):
    module = dm(dataset, tmp_path)
    with pytest.raises(SSLError) as info:
        module.setup("fit")
    msg = str(info.value)
    assert str(tmp_path) in msg and folder in msg
    assert "download" in msg


def test_missing_image_folder(tmp_path):
    with pytest.raises(SSLError, match="does not exist") as info:
        dm("image_folder", tmp_path / "nowhere").setup("fit")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_empty_folder_names_the_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(SSLError) as info:
        dm("image_folder", tmp_path).setup("fit")
    msg = str(info.value)
    assert "No images found" in msg and str(tmp_path) in msg


def test_empty_class_folders(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(SSLError, match="No images found") as info:
        dm("image_folder", tmp_path).setup("fit")
    assert str(tmp_path / "train") in str(info.value)


def test_class_list_errors(tmp_path):
    standins.write_image_folder(tmp_path / "data", standins.FAKE_WNIDS[:2], train_per_class=2, val_per_class=1)
    with pytest.raises(SSLError, match="does not exist") as info:
        dm("imagenet100", tmp_path / "data", dataset_options={"class_list": str(tmp_path / "missing.txt")}).setup("fit")
    assert str(tmp_path / "missing.txt") in str(info.value)
    listed = standins.write_class_list(tmp_path / "classes.txt", standins.FAKE_WNIDS[:3])
    with pytest.raises(SSLError) as info:
        dm("imagenet100", tmp_path / "data", dataset_options={"class_list": str(listed)}).setup("fit")
    assert standins.FAKE_WNIDS[2] in str(info.value) and "not folders" in str(info.value)


def test_imagenet100_default_class_list_missing_folders(tmp_path):
    """The built-in ImageNet-100 list against a folder without those classes: names the missing ones."""
    standins.write_image_folder(tmp_path, standins.FAKE_WNIDS[:2], train_per_class=1, val_per_class=1)
    with pytest.raises(SSLError, match="100 classes of the class list are not folders"):
        dm("imagenet100", tmp_path).setup("fit")


def test_image_folder_cannot_download(tmp_path):
    with pytest.raises(SSLError, match="download=false"):
        dm("image_folder", tmp_path, download=True).prepare_data()


# ---- unreadable images ----------------------------------------------------------------------------------------
@pytest.fixture
def bad_folders(tmp_path):
    """Two flat folders, each with good images and one bad file (sorted last, so index -1); and
    ``labelled``: class folders ``train/{a,b}`` (a: 3 PNGs + a truncated PNG, b: 2 PNGs + a text file named
    .jpg, each sorted last in its class) and a clean ``val/{a,b}``, with its two bad files."""
    corrupt, truncated, labelled = tmp_path / "corrupt", tmp_path / "truncated", tmp_path / "labelled"
    for folder in (corrupt, truncated):
        for i in range(3):
            standins.write_image(folder / f"a_{i}.png", seed=i)
    for name, n in (("a", 3), ("b", 2)):
        for i in range(n):
            standins.write_image(labelled / "train" / name / f"{name}_{i}.png", (32, 32), seed=10 * n + i)
        standins.write_image(labelled / "val" / name / f"{name}_0.png", (32, 32), seed=n)
    bad = (standins.write_truncated_jpeg(labelled / "train" / "a" / "a_9.png"),  # the format follows the suffix: PNG
           standins.write_corrupt_image(labelled / "train" / "b" / "b_9.jpg"))  # text bytes
    return {"corrupt": (corrupt, standins.write_corrupt_image(corrupt / "z_bad.jpg")),
            "truncated": (truncated, standins.write_truncated_jpeg(truncated / "z_bad.jpg")),
            "labelled": (labelled, bad)}


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_bad_image_names_the_file(bad_folders, kind):
    folder, bad = bad_folders[kind]
    ds = ImageFolderDataset(folder)
    assert len(ds) == 4
    ds[0]  # the good ones read
    with pytest.raises(SSLError) as info:
        ds[3]
    msg = str(info.value)
    assert str(bad) in msg and "Remove or replace" in msg


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_bad_image_through_the_data_module(bad_folders, kind):
    folder, bad = bad_folders[kind]
    module = dm("image_folder", folder, batch_size=4, image_size=32)
    module.setup("fit")  # listing the folder does not read the images
    with pytest.raises(SSLError) as info:
        next(iter(module.train_dataloader()))  # num_workers=0: the SSLError itself
    assert str(bad) in str(info.value)
    with pytest.raises(SSLError) as info:
        list(DataLoader(ImageFolderDataset(folder), batch_size=None, num_workers=0))
    assert str(bad) in str(info.value)


def test_bad_image_in_a_worker_keeps_type_and_message(bad_folders):
    """DataLoader workers re-raise the SSLError (same type); the CLI recovers the one-line message."""
    folder, bad = bad_folders["truncated"]
    loader = DataLoader(ImageFolderDataset(folder), batch_size=None, num_workers=1)
    with pytest.raises(SSLError) as info:
        list(loader)
    line = _user_message(info.value)
    assert line.startswith("Cannot read image") and str(bad) in line and "\n" not in line


# ---- unreadable images found before a run: check-data ---------------------------------------------------------------
def run_check(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args=["check-data", *args])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_check_data_lists_bad_files_and_counts(bad_folders, tmp_path, capsys, monkeypatch):
    """A truncated PNG and a text file named .jpg: both listed (decoding, not just the header), exit 1; the
    counts per class include them; the JSON report says the same."""
    folder, (truncated, text) = bad_folders["labelled"]
    report = tmp_path / "report.json"
    code, out, _ = run_check(["--data.dataset", "image_folder", "--data.root", str(folder), "--workers", "2",
                              "--output", str(report)], capsys, monkeypatch)
    assert code == 1, out
    lines = out.splitlines()
    assert f"train (pretraining, kNN bank and probes): 7 images, {folder / 'train'}" in lines
    assert "  per class   a 4, b 3" in lines and "  unreadable  2" in lines
    assert f"    {truncated}: OSError: image file is truncated" in lines
    assert any(line.startswith(f"    {text}: UnidentifiedImageError") for line in lines)
    assert "  width       min 32 / median 32 / max 32 px" in lines  # the 5 readable train images
    assert "  modes       RGB 5" in lines
    assert f"val (validation): 2 images, {folder / 'val'}" in lines and "  unreadable  0" in lines
    assert lines[-2].startswith("bad files: 2: remove or replace them, or set data.on_bad_image: skip")
    data = json.loads(report.read_text())
    train, val = data["splits"]
    assert data["bad_files"] == 2 and data["images"] == 9
    assert {b["path"] for b in train["bad"]} == {str(truncated), str(text)} and val["bad"] == []
    assert train["classes"] == {"a": 4, "b": 3} and val["classes"] == {"a": 1, "b": 1}
    assert train["width"] == {"min": 32, "median": 32, "max": 32} and train["modes"] == {"RGB": 5}


def test_check_data_clean_folder_config_and_arrays(tmp_path, bad_folders, capsys, monkeypatch):
    """A fit config's data: section is read (later flags win); a clean folder and arrays exit 0."""
    good = standins.write_image_folder(tmp_path / "good", ["x", "y"], train_per_class=2, val_per_class=1)
    config = tmp_path / "fit.yaml"
    config.write_text(f"model:\n  class_path: SimCLR\ndata:\n  dataset: image_folder\n  root: {good}\n"
                      "  batch_size: 8\n  num_workers: 0\n")
    code, out, _ = run_check(["--config", str(config), "--workers", "1"], capsys, monkeypatch)
    assert code == 0, out
    assert "  per class   x 2, y 2" in out and out.splitlines()[-1] == "bad files: 0"
    code, out, _ = run_check(["--config", str(config), "--data.root", str(bad_folders["labelled"][0])], capsys,
                             monkeypatch)
    assert code == 1 and "bad files: 2" in out
    code, out, _ = run_check(["--data.dataset", "synthetic", "--data.dataset_options", "{size: 12, num_classes: 2}"],
                             capsys, monkeypatch)
    assert code == 0, out
    assert "train (pretraining, kNN bank and probes): 12 images, in-memory arrays: nothing can be unreadable" in out
    assert "  width       min 32 / median 32 / max 32 px" in out and "  modes       RGB 12" in out
    assert "unreadable" not in out.replace("nothing can be unreadable", "")
    code, _, err = run_check(["--config", str(tmp_path / "missing.yaml")], capsys, monkeypatch)
    assert code == 2 and "missing.yaml" in err and "does not exist" in err


# ---- unreadable images met during a run: data.on_bad_image -----------------------------------------------------------
def test_on_bad_image_rejects_unknown_value():
    with pytest.raises(SSLError, match='Unknown data.on_bad_image .ignore.*"skip"'):
        dm("synthetic", on_bad_image="ignore")


@pytest.mark.parametrize("augment", ["workers", "device"])
def test_on_bad_image_skip_full_batches_deterministic(bad_folders, augment):
    """skip: full batches; each bad sample is the next readable one, (i + 1) % n (with its label), the same every
    time; one warning per bad file naming it; "error" still stops at the first one."""
    folder, (truncated, text) = bad_folders["labelled"]  # train: a_0 a_1 a_2 a_9(bad) b_0 b_1 b_9(bad)
    with pytest.raises(SSLError, match="Cannot read image .*Remove or replace this file"):
        next(iter(dm("image_folder", folder, batch_size=7, image_size=16, augment=augment).train_dataloader()))
    module = dm("image_folder", folder, batch_size=7, image_size=16, augment=augment, on_bad_image="skip")
    module.setup("fit")
    with pytest.warns(BadImageWarning) as caught:
        first = next(iter(module.train_dataloader()))
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, BadImageWarning))
    assert len(messages) == 2 and str(truncated) in messages[0] and str(text) in messages[1]
    assert all("data.on_bad_image=skip" in m for m in messages)
    counts = sorted(int(re.search(r"; (\d+) unreadable images? skipped so far in this process", m)[1]) for m in messages)
    assert counts[1] == counts[0] + 1  # a running count (of this process: earlier tests' files included)
    again = next(iter(module.train_dataloader()))  # same epoch: the same batch, no new warning
    if augment == "device":
        first, again = module.augment_batch(first), module.augment_batch(again)
    views, labels, indices = first
    assert [v.shape for v in views] == [(7, 3, 16, 16)] * 2  # full size
    assert torch.equal(indices, again[2]) and torch.equal(labels, again[1])
    assert all(torch.equal(a, b) for a, b in zip(views, again[0]))
    by_index = dict(zip(indices.tolist(), labels.tolist()))
    assert by_index[3] == 1 and by_index[6] == 0  # a_9 -> b_0 (class b), b_9 -> a_0 (class a)
    base = module.pretrain_set.base
    for bad, replacement in ((3, 4), (6, 0)):
        image, label = base[bad]
        good, good_label = base[replacement]
        assert label == good_label and torch.equal(TF.pil_to_tensor(image), TF.pil_to_tensor(good))
    eval_images, eval_labels = next(iter(module.val_dataloader()[0]))  # the kNN bank reads the same folder
    assert eval_images.shape[0] == 7 and eval_labels.tolist() == [0, 0, 0, 1, 1, 1, 0]


def test_on_bad_image_skip_same_batches_with_workers(bad_folders):
    """The replacement does not depend on the loader workers."""
    folder, _ = bad_folders["corrupt"]  # a_0 a_1 a_2 z_bad.jpg
    batches = []
    for workers in (2, 0):  # workers first: they meet the bad file fresh, not knowing it from this process
        module = dm("image_folder", folder, batch_size=4, image_size=16, on_bad_image="skip", num_workers=workers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadImageWarning)
            batches.append(next(iter(module.train_dataloader())))
    (v2, l2, i2), (v0, l0, i0) = batches
    assert torch.equal(i0, i2) and all(torch.equal(a, b) for a, b in zip(v0, v2)) and v0[0].shape[0] == 4


# ---- sizes --------------------------------------------------------------------------------------------------------
def test_batch_larger_than_dataset():
    module = dm("synthetic", batch_size=32, dataset_options={"size": 16})
    with pytest.raises(SSLError) as info:
        module.setup("fit")
    msg = str(info.value)
    assert "batch_size" in msg and "16 images" in msg and "32" in msg


def test_batch_larger_than_train_subset():
    module = dm("synthetic", batch_size=16, train_subset=8, dataset_options={"size": 64})
    with pytest.raises(SSLError, match="batch_size"):
        module.setup("fit")


# ---- through the command line ------------------------------------------------------------------------------
def cli_args(tmp_path, *extra: str) -> list[str]:
    return ["fit", *extra, "--model.backbone", "convnet", "--model.backbone_kwargs", "{width: 4}",
            "--data.batch_size", "4", "--data.num_workers", "0", "--data.pin_memory", "false",
            "--data.eval_batch_size", "8", "--trainer.logger", "false", "--trainer.max_steps", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
            "--seed_everything", "0", "--run_dir", str(tmp_path / "run")]


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])  # pytest's own arguments are not the CLI's
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args=args)
    return info.value.code, capsys.readouterr().err


def test_cli_unknown_dataset(tmp_path, capsys, monkeypatch):
    code, err = run_cli(cli_args(tmp_path, "--model", "SimCLR", "--data.dataset", "nope"), capsys, monkeypatch)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Unknown dataset 'nope'" in errors[0] and "cifar10" in errors[0]
    assert "Traceback" not in err


def test_cli_missing_data_root_inside_fit(tmp_path, capsys, monkeypatch):
    """The SSLError is raised in the trainer's setup (datamodule.setup): still one line, exit code 2."""
    code, err = run_cli(cli_args(tmp_path, "--model", "SimCLR", "--data.dataset", "cifar10",
                                 "--data.root", str(tmp_path / "nowhere")), capsys, monkeypatch)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CIFAR10 not found" in errors[0] and "download" in errors[0], err
    assert "Traceback" not in err


def test_cli_unknown_method(tmp_path, capsys, monkeypatch):
    """One error line that lists the registered methods and says how to name your own."""
    code, err = run_cli(cli_args(tmp_path, "--model", "NoSuchMethod", "--data.dataset", "synthetic"), capsys,
                         monkeypatch)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Unknown method 'NoSuchMethod'" in errors[0], err
    assert ", ".join(METHODS.names()) in errors[0] and "my_module.MyMethod" in errors[0]
    assert "Traceback" not in err


def test_cli_unknown_method_in_config_file(tmp_path, capsys, monkeypatch):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  class_path: SimCLRR\ndata:\n  dataset: synthetic\n")
    code, err = run_cli(cli_args(tmp_path, "--config", str(config)), capsys, monkeypatch)
    assert code == 2 and "Unknown method 'SimCLRR'" in err and "Traceback" not in err


def test_cli_progress_bar_can_be_disabled(tmp_path, monkeypatch):
    """--trainer.enable_progress_bar false used to clash with the CLI's default RichProgressBar."""
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
    main(args=cli_args(tmp_path, "--model", "SimCLR", "--model.proj_hidden", "16", "--model.proj_out", "8",
                       "--data.dataset", "synthetic", "--data.dataset_options", "{size: 16}"))
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # it trained


def test_cli_fit_skips_bad_images(tmp_path, bad_folders, monkeypatch):
    """data.on_bad_image: skip through the command line: a folder with a corrupt file trains (augment: device)."""
    folder, _ = bad_folders["corrupt"]
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
    with pytest.warns(BadImageWarning, match="z_bad.jpg"):
        main(args=cli_args(tmp_path, "--model", "SimCLR", "--model.proj_hidden", "16", "--model.proj_out", "8",
                           "--data.dataset", "image_folder", "--data.root", str(folder), "--data.image_size", "16",
                           "--data.augment", "device", "--data.on_bad_image", "skip"))
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert "on_bad_image: skip" in (tmp_path / "run" / "config.yaml").read_text()


def test_cli_keeps_default_callbacks_otherwise(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar

    from ssl_lightning.cli import SSLCLI

    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
    args = ["--model", "SimCLR", "--model.backbone", "convnet", "--data.dataset", "synthetic",
            "--trainer.accelerator", "cpu", "--run_dir", str(tmp_path / "run")]  # default logger and bar
    cli = SSLCLI(args=args, run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert RichProgressBar in kinds and LearningRateMonitor in kinds
