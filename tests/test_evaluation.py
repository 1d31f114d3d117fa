"""Evaluation commands (linear, transfer, knn, finetune, cluster, export) on tiny checkpoints of synthetic data."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
import yaml

from ssl_lightning.data import SSLDataModule
from ssl_lightning.data.datasets import DATASETS, DatasetSpec, load_synthetic
from ssl_lightning.data.folder import ArrayDataset
from ssl_lightning.evaluation import cli as ev
from ssl_lightning.evaluation.checkpoint import load_backbone, load_module
from ssl_lightning.evaluation.data import EvalData
from ssl_lightning.evaluation.features import extract_features
from ssl_lightning.evaluation.linear import Classifier, fit_classifier
from ssl_lightning.evaluation.subsets import stratified_subset
from ssl_lightning.methods.joint_embedding.simclr import SimCLR
from ssl_lightning.registry import SSLError

REPO = Path(__file__).resolve().parents[1]
QUIET = {"accelerator": "cpu", "enable_progress_bar": False}
SYNTH = {"size": 48, "num_classes": 4}
DATA = EvalData(batch_size=16, eval_batch_size=32, num_workers=0)
FAST = ev.Training(epochs=1, lr=0.1)


def make_checkpoint(run_dir: Path, backbone: str = "convnet", **backbone_kwargs) -> Path:
    """A 1-step SimCLR fit on synthetic data saved as ``run_dir/checkpoints/last.ckpt``, with the
    run's ``config.yaml`` beside it (as the CLI writes it: it names the method and the data)."""
    torch.manual_seed(0)
    dm = SSLDataModule(dataset="synthetic", batch_size=8, num_workers=0, pin_memory=False, dataset_options=SYNTH)
    model = SimCLR(backbone=backbone, backbone_kwargs=backbone_kwargs, in_channels=3, proj_hidden=32, proj_out=16)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=run_dir)
    trainer.fit(model, datamodule=dm)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "model": {"class_path": "ssl_lightning.methods.SimCLR"},
        "data": {"dataset": "synthetic", "dataset_options": SYNTH}}))
    return ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run"), width=8)


def test_linear_keeps_bn_statistics_and_backbone_fixed():
    backbone = SimCLR(backbone="convnet", backbone_kwargs={"width": 8}).backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = Classifier(backbone, num_classes=3, lr=1.0)
    head = model.head.weight.detach().clone()
    x, y = torch.randn(32, 3, 16, 16) * 3 + 1, torch.randint(3, (32,))  # far from the BN statistics
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    scores, _ = fit_classifier(model, loader, loader, epochs=2, trainer=QUIET)
    after = backbone.state_dict()
    assert any("running_mean" in k for k in after)
    for k, v in before.items():  # running_mean / running_var / num_batches_tracked and weights
        assert torch.equal(v, after[k]), k
    assert not backbone.training and not torch.equal(head, model.head.weight)
    assert set(scores) == {"top1", "top5"}


@pytest.mark.parametrize("cached", [True, False])
def test_linear_cached_and_augmented(ckpt, tmp_path, cached):
    out = ev.linear(str(ckpt), data=DATA, train=FAST, cached=cached, trainer=QUIET, out_dir=str(tmp_path))
    assert out["mode"] == ("cached" if cached else "augmented") and out["dataset"] == "synthetic"  # from config.yaml
    assert 0 <= out["top1"] <= out["top5"] <= 1 and out["num_train"] == 48 and out["num_classes"] == 4
    assert json.loads((tmp_path / "results.json").read_text())["top1"] == out["top1"]


def test_default_out_dir_is_the_runs_eval_folder(ckpt):
    out = ev.knn(str(ckpt), data=DATA, k=[5], temperature=[0.1])
    assert Path(out["results_file"]) == ckpt.parent.parent / "eval" / "knn" / "results.json"


def test_knn_sweeps_k_and_temperature(ckpt, tmp_path):
    out = ev.knn(str(ckpt), data=DATA, k=[1, 5, 100], temperature=[0.07, 0.1], out_dir=str(tmp_path))
    assert [(r["k"], r["temperature"]) for r in out["table"]] == [(1, 0.07), (1, 0.1), (5, 0.07), (5, 0.1), (100, 0.07), (100, 0.1)]
    assert all(set(r) == {"k", "temperature", "top1"} and 0 <= r["top1"] <= 1 for r in out["table"])
    assert out["best"]["top1"] == max(r["top1"] for r in out["table"])
    # k=1 kNN by hand: the label of the most cosine-similar training image
    backbone, _ = load_backbone(ckpt)
    train = load_synthetic("", "train", **SYNTH)
    val = load_synthetic("", "val", **SYNTH)
    norm = lambda ds: ((ds.images.float() / 255) - 0.5) / 0.25  # noqa: E731  (synthetic mean / std)
    with torch.no_grad():
        tf, vf = backbone(norm(train)), backbone(norm(val))
    sims = torch.nn.functional.normalize(vf, dim=1) @ torch.nn.functional.normalize(tf, dim=1).T
    expected = float((train.targets[sims.argmax(1)] == val.targets).float().mean())
    assert out["table"][0]["top1"] == pytest.approx(expected)


def test_finetune_subset_is_stratified_seeded_and_reloadable(ckpt, tmp_path):
    labels = torch.arange(5).repeat_interleave(torch.tensor([10, 20, 30, 40, 100]))
    subset = stratified_subset(labels, fraction=0.1, seed=3)
    assert torch.bincount(labels[subset]).tolist() == [1, 2, 3, 4, 10]
    assert subset == stratified_subset(labels, fraction=0.1, seed=3) != stratified_subset(labels, fraction=0.1, seed=4)
    assert torch.bincount(labels[stratified_subset(labels, per_class=7)]).tolist() == [7] * 5
    with pytest.raises(SSLError, match="per_class"):
        stratified_subset(labels, per_class=11)

    first = ev.finetune(str(ckpt), data=DATA, train=FAST, fraction=0.25, trainer=QUIET, out_dir=str(tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / "subset.json").read_text())
    train_labels = load_synthetic("", "train", **SYNTH).targets
    assert first["subset_size"] == len(saved["indices"]) == first["num_train_used"]
    assert torch.bincount(train_labels[saved["indices"]], minlength=4).tolist() == \
        [max(1, round(0.25 * int(n))) for n in torch.bincount(train_labels, minlength=4)]
    again = ev.finetune(str(ckpt), data=DATA, train=FAST, subset_file=str(tmp_path / "a" / "subset.json"),
                        trainer=QUIET, out_dir=str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "subset.json").read_text())["indices"] == saved["indices"]
    assert again["subset_size"] == first["subset_size"]
    (tmp_path / "other.json").write_text(json.dumps({**saved, "dataset": "cifar10"}))
    with pytest.raises(SSLError, match="made for cifar10"):
        ev.finetune(str(ckpt), data=DATA, train=FAST, subset_file=str(tmp_path / "other.json"), trainer=QUIET,
                    out_dir=str(tmp_path / "c"))


def test_cluster_metrics_on_features(ckpt, tmp_path):
    out = ev.cluster(str(ckpt), data=DATA, n_init=2, out_dir=str(tmp_path))
    assert out["num_clusters"] == 4 and out["source"] == "features"
    assert all(-1 <= out[m] <= 1 for m in ("nmi", "ami", "ari", "acc")) and 0.25 <= out["acc"]  # >= a class's share
    with pytest.raises(SSLError, match="no class head"):  # SimCLR has none
        ev.cluster(str(ckpt), data=DATA, source="head", out_dir=str(tmp_path))


def test_load_module_rebuilds_the_method(ckpt):
    module = load_module(ckpt)  # class from the run's config.yaml
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert type(module) is SimCLR and all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert type(load_module(ckpt, method="simclr")) is SimCLR
    with pytest.raises(SSLError, match="Unknown method"):
        load_module(ckpt, method="nosuchmethod")


def test_export_loads_into_a_fresh_torchvision_resnet18(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run18", backbone="resnet18")
    out = ev.export(str(ckpt), out_dir=str(tmp_path / "export"))
    assert out["format"] == "torchvision"
    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict(torch.load(out["weights"], weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    resnet.fc = torch.nn.Identity()
    ours, info = load_backbone(ckpt)
    reloaded, info2 = load_backbone(out["weights"])  # the exported file, with its .json
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(resnet.eval()(x), ours(x)) and torch.equal(reloaded(x), ours(x))
    assert info2["backbone"] == "resnet18" and info2["data"]["dataset"] == "synthetic"


class Payload:
    """Unpickling this would create a file: a stand-in for arbitrary code in a weight file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weight_files_with_pickled_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "x": Payload(str(marker))}, path)
    with pytest.raises(SSLError, match="Refusing to load"):
        load_backbone(path)
    with pytest.raises(SSLError, match="Refusing to load"):
        ev.knn(str(path), data=EvalData(dataset="synthetic"))
    assert not marker.exists()


def test_every_torch_load_in_the_project_is_weights_only():
    offenders = []
    for path in [*REPO.glob("ssl_lightning/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("experiments/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert offenders == []


def test_grayscale_conversion_for_other_channel_counts(ckpt, tmp_path):
    gray = EvalData(dataset="synthetic", dataset_options={**SYNTH, "channels": 1}, batch_size=16, num_workers=0)
    with pytest.raises(SSLError, match="--data.grayscale true"):
        ev.transfer(str(ckpt), data=gray, train=FAST, cached=True, trainer=QUIET, out_dir=str(tmp_path))
    gray.grayscale = True
    out = ev.transfer(str(ckpt), data=gray, train=FAST, cached=True, trainer=QUIET, out_dir=str(tmp_path))
    assert out["command"] == "transfer-synthetic" and 0 <= out["top1"] <= 1


# ---- no leakage: nothing is ever trained on the validation split ------------------------------------
POISON = 3  # the only val label; no training image has it


class Recording(ArrayDataset):
    """Synthetic images that remember which indices were read."""

    def __init__(self, images, labels) -> None:
        super().__init__(images, labels)
        self.read: set[int] = set()

    def __getitem__(self, i):
        self.read.add(int(i))
        return super().__getitem__(i)


SPLITS: dict[str, Recording] = {}


def load_leak_probe(root: str, split: str, download: bool = False) -> Recording:
    ds = load_synthetic(root, split, size=40, num_classes=4)
    labels = ds.targets % POISON if split == "train" else torch.full_like(ds.targets, POISON)  # poisoned val labels
    SPLITS[split] = Recording(ds.images, labels)
    return SPLITS[split]


if "leak_probe" not in DATASETS:
    DATASETS.register("leak_probe")(DatasetSpec(load_leak_probe, 4, 3, 32, (0.5,) * 3, (0.25,) * 3))


def test_no_evaluation_trains_on_the_validation_split(ckpt, tmp_path, monkeypatch):
    seen: list[torch.Tensor] = []
    original = Classifier.training_step
    monkeypatch.setattr(Classifier, "training_step", lambda self, batch, i: seen.append(batch[1]) or original(self, batch, i))
    data = EvalData(dataset="leak_probe", batch_size=8, num_workers=0)
    for cached in (True, False):
        ev.linear(str(ckpt), data=data, train=FAST, cached=cached, trainer=QUIET, out_dir=str(tmp_path / "l"))
        assert seen and POISON not in torch.cat(seen).tolist()
        seen.clear()
    out = ev.finetune(str(ckpt), data=data, train=FAST, fraction=0.5, trainer=QUIET, out_dir=str(tmp_path / "f"))
    subset = json.loads(Path(out["subset_file"]).read_text())["indices"]
    assert SPLITS["train"].read == set(subset) and SPLITS["val"].read == set(range(40))  # train reads: the subset only
    assert seen and POISON not in torch.cat(seen).tolist()
    knn = ev.knn(str(ckpt), data=data, k=[1, 10], temperature=[0.1], out_dir=str(tmp_path / "k"))
    assert all(r["top1"] == 0.0 for r in knn["table"])  # the bank never holds a val label


def test_features_are_extracted_in_eval_mode_and_restore_the_mode():
    backbone = SimCLR(backbone="convnet", backbone_kwargs={"width": 8}).backbone.train()
    x = torch.randn(10, 3, 16, 16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(10)), batch_size=4)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    feats, labels = extract_features(backbone, loader)
    assert backbone.training and all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.allclose(feats, backbone.eval()(x), atol=1e-6) and labels.tolist() == list(range(10))


def test_cli_dispatch(ckpt, tmp_path, capsys):
    from ssl_lightning.cli import main

    with pytest.raises(SystemExit) as e:
        main(["knn", "--help"])
    assert e.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    main(["knn", "--config", str(REPO / "experiments/eval/knn.yaml"), "--checkpoint", str(ckpt), "--data.num_workers", "0",
          "--k", "[3]", "--temperature", "[0.1]", "--out_dir", str(tmp_path)])
    assert "weighted kNN" in capsys.readouterr().out and (tmp_path / "results.json").is_file()
    with pytest.raises(SystemExit) as e:
        main(["linear", "--checkpoint", str(tmp_path / "missing.ckpt")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # type-checked flags
        main(["linear", "--checkpoint", str(ckpt), "--train.lr", "abc"])
    assert e.value.code == 2


@pytest.mark.parametrize("config", sorted((REPO / "experiments/eval").glob("*.yaml")), ids=lambda p: p.stem)
def test_eval_configs_parse(config, capsys):
    from ssl_lightning.cli import main

    with pytest.raises(SystemExit) as e:
        main([config.stem.split("_")[0], "--config", str(config), "--checkpoint", "x.ckpt", "--print_config"])
    assert e.value.code == 0 and "checkpoint: x.ckpt" in capsys.readouterr().out


def test_embed_and_retrieve_commands_write_pngs(ckpt, tmp_path):
    out = ev.embed(str(ckpt), data=DATA, method="tsne", out_dir=str(tmp_path))
    assert Path(out["png"]).stat().st_size > 0 and out["split"] == "val"
    out = ev.retrieve(str(ckpt), data=DATA, num_queries=3, k=4, out_dir=str(tmp_path))
    assert Path(out["png"]).stat().st_size > 0 and len(out["queries"]) == 3


def test_data_and_settings_errors_name_the_fix(tmp_path):
    import standins
    from torch import nn

    from ssl_lightning.evaluation.data import eval_splits, resolve_data

    with pytest.raises(SSLError, match="Which dataset.*--data.dataset"):  # an exported file without its run
        resolve_data(EvalData(), {"checkpoint": "backbone.pt"})
    flat = standins.write_flat_folder(tmp_path / "flat")  # images without class folders: unlabelled
    with pytest.raises(SSLError, match="has no labels here"):
        eval_splits(EvalData(dataset="image_folder", root=str(flat)), 3)
    labelled = standins.write_image_folder(tmp_path / "folder", classes=["a", "b"])
    shutil.rmtree(labelled / "val")  # a train split only
    with pytest.raises(SSLError, match="no validation split"):
        eval_splits(EvalData(dataset="image_folder", root=str(labelled)), 3)
    backbone = nn.Identity()
    backbone.num_features = 4
    with pytest.raises(SSLError, match="Unknown schedule 'linear'"):
        Classifier(backbone, 2, schedule="linear")


def test_on_bad_image_follows_the_run(tmp_path):
    """The evaluation commands take the run's data.on_bad_image (skip: the kNN bank keeps its size)."""
    import standins

    from ssl_lightning.evaluation.data import eval_splits, resolve_data

    run = {"checkpoint": "last.ckpt", "data": {"dataset": "image_folder", "on_bad_image": "skip"}}
    assert resolve_data(EvalData(), run).on_bad_image == "skip"
    assert resolve_data(EvalData(on_bad_image="error"), run).on_bad_image == "error"
    assert resolve_data(EvalData(dataset="cifar10"), run).on_bad_image is None  # another dataset: not the run's
    root = standins.write_image_folder(tmp_path / "folder", classes=["a", "b"], train_per_class=2, val_per_class=1)
    standins.write_corrupt_image(root / "train" / "b" / "b_9.jpg")
    splits = eval_splits(EvalData(dataset="image_folder", root=str(root), eval_batch_size=8, num_workers=0,
                                  on_bad_image="skip"), 3)
    with pytest.warns(UserWarning, match="b_9.jpg"):
        images, labels = next(iter(splits.loader(splits.train_set(augment=False), train=False)))
    assert images.shape[0] == 5 and labels.tolist() == [0, 0, 1, 1, 0]  # b_9 -> the next readable: a's first
    strict = eval_splits(EvalData(dataset="image_folder", root=str(root), eval_batch_size=8, num_workers=0), 3)
    with pytest.raises(SSLError, match="b_9.jpg"):
        next(iter(strict.loader(strict.train_set(augment=False), train=False)))
