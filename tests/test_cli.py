"""The ``ssl-lightning`` command: configs, run directories, validate, resume, loggers."""
from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import standins  # noqa: E402
from ddp_utils import free_port  # noqa: E402

from ssl_lightning.cli import main  # noqa: E402
from ssl_lightning.methods import SimCLR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO)) for pattern in ("*/*.yaml", "*/semi/*.yaml")  # eval: test_evaluation
                 for p in (REPO / "experiments").glob(pattern) if p.parent.name != "eval")
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
QUICK = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_model_summary", "false",
         "--trainer.num_sanity_val_steps", "0", "--data.num_workers", "0", "--data.pin_memory", "false"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ lands in the test's folder
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])  # pytest's own arguments are not the CLI's
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as e:  # --print_config exits 0
        assert e.code in (0, None), f"exit code {e.code}"


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config, capsys):
    run("fit", "--config", str(REPO / config), "--print_config")
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("ssl_lightning.methods.")
    assert printed["data"]["dataset"] in config


def _fit_small_fmnist(run_dir: Path, *extra: str) -> None:
    run("fit", "--config", str(REPO / "experiments/fashion_mnist/simclr.yaml"), *QUICK,
        "--run_dir", str(run_dir), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", ".",
        "--data.batch_size", "32", "--data.train_subset", "256", "--data.eval_subset", "300",
        "--data.val_subset", "100", *extra)


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fit_validate_resume(tmp_path, capsys):
    run_dir = Path("run")  # relative to the test's folder, as users type it
    _fit_small_fmnist(run_dir)
    out = capsys.readouterr().out
    assert f"run directory : {run_dir}" in out and "checkpoint" in out and "val/knn_top1" in out
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run_dir"] == str(run_dir) and config["data"]["dataset"] == "fashion_mnist"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    metrics = list(csv.DictReader(open(glob.glob(str(run_dir / "lightning_logs/version_*/metrics.csv"))[0])))
    knn = [float(r["val/knn_top1"]) for r in metrics if r.get("val/knn_top1")]
    probe = [float(r["val/probe_top1"]) for r in metrics if r.get("val/probe_top1")]
    assert len(knn) == 1 and 0.1 < knn[0] <= 1 and len(probe) == 1
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["num_classes"] == 10
    model = SimCLR.load_from_checkpoint(last, map_location="cpu").eval()  # a plain Lightning reload
    assert model.probe is not None and model(torch.zeros(2, 1, 28, 28)).shape == (2, 256)

    # validate the checkpoint with the saved config
    run("validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(last))
    assert "val/knn_top1" in capsys.readouterr().out

    # resume: one more epoch continues from step 3
    run("fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(last), "--trainer.max_epochs", "2")
    assert torch.load(last, weights_only=True)["global_step"] == 6
    logs = sorted(run_dir.rglob("metrics.csv"))  # fit, validate, resume; relative paths not nested again
    assert len(logs) == 3 and all(p.parent.parent == run_dir / "lightning_logs" for p in logs)


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_wandb_offline_run_lands_in_run_dir(tmp_path):
    run_dir = tmp_path / "wb"
    run("fit", "--config", str(REPO / "experiments/fashion_mnist/byol.yaml"), *QUICK, "--run_dir", str(run_dir),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--data.batch_size", "16", "--data.train_subset", "64", "--data.eval_subset", "64", "--data.val_subset", "32")
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert runs, os.listdir(run_dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


def _standin(dataset: str, root: Path) -> list[str]:
    if dataset == "cifar10":
        standins.write_cifar10(root)
        return []
    if dataset == "stl10":
        standins.write_stl10(root)
        return []
    classes = standins.FAKE_WNIDS
    standins.write_image_folder(root, classes)
    class_list = standins.write_class_list(root / "classes.txt", classes)
    return ["--data.dataset_options", f'{{"class_list": "{class_list}"}}']


# every method's CIFAR-10 recipe, and the STL-10 / ImageNet-100 data paths with SimCLR and BYOL
# (the other methods' recipes there differ only in numbers that --print_config already checks)
STEP_CONFIGS = [c for c in CONFIGS if c.startswith("experiments/cifar10/") and "/semi/" not in c
                or (c.split("/")[1] in ("stl10", "imagenet100") and Path(c).stem in ("simclr", "byol"))]


# what a 4-image batch (or the 40-image stand-in) needs changed: W-MSE whitens sub-batches of w_size > emb images,
# DeepCluster clusters the whole training set into fewer clusters than images
SMALL_BATCH = {"wmse": ["--model.init_args.w_size", "4", "--model.init_args.emb", "2"],
               "deepcluster": ["--model.init_args.num_clusters", "4", "--model.init_args.pca_dim", "8"]}


@pytest.mark.parametrize("config", STEP_CONFIGS)
def test_gpu_recipes_run_a_step_on_standins(config, tmp_path):
    """The CIFAR-10 / STL-10 / ImageNet-100 recipes train through the CLI (on generated files in
    the real on-disk formats, with the recipe's model and views; batch and steps cut down)."""
    dataset = config.split("/")[1]
    root = tmp_path / "data"
    extra = _standin(dataset, root)
    run_dir = tmp_path / "run"
    extra += SMALL_BATCH.get(Path(config).stem, [])
    run("fit", "--config", str(REPO / config), *QUICK, "--run_dir", str(run_dir), "--trainer.logger", "false",
        "--trainer.precision", "32-true", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
        "--data.root", str(root), "--data.batch_size", "4", "--data.eval_batch_size", "4", *extra)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1
    assert ckpt["hyper_parameters"]["backbone"] == "resnet18"


# the semi-supervised CIFAR-10 recipes (the 4000-label ones differ from these only in data.num_labels, which
# --print_config checks): a step of the recipe's WRN-28-2 and views on the 40-image stand-in, 1 label per class
SEMI_STEP_CONFIGS = [c for c in CONFIGS if c.startswith("experiments/cifar10/semi/") and c.endswith("_250.yaml")]


@pytest.mark.parametrize("config", SEMI_STEP_CONFIGS)
def test_semi_supervised_recipes_run_a_step_on_the_standin(config, tmp_path):
    root, run_dir = tmp_path / "data", tmp_path / "run"
    standins.write_cifar10(root)
    run("fit", "--config", str(REPO / config), *QUICK, "--run_dir", str(run_dir), "--trainer.logger", "false",
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "1",
        "--data.root", str(root), "--data.num_labels", "10", "--data.num_val", "10", "--data.batch_size", "2",
        "--data.eval_batch_size", "4")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["hyper_parameters"]["backbone"] == "wide_resnet28_2"


def test_short_method_names(capsys):
    run("fit", "--model", "byol", "--data.dataset", "synthetic", "--print_config")
    assert "class_path: ssl_lightning.methods.joint_embedding.byol.BYOL" in capsys.readouterr().out
    run("fit", "--model=SimCLR", "--data.dataset", "synthetic", "--print_config")
    assert "class_path: ssl_lightning.methods.joint_embedding.simclr.SimCLR" in capsys.readouterr().out


#: the tiny run the DDP tests launch as real ``ssl-lightning`` processes (8 images per process)
TINY_DDP = ["fit", "--model", "simclr", "--model.backbone", "convnet", "--model.backbone_kwargs", "{width: 8}",
            "--model.proj_hidden", "32", "--model.proj_out", "16", "--data.dataset", "synthetic",
            "--data.dataset_options", "{size: 64, channels: 1, image_size: 16}", "--data.batch_size", "8", *QUICK,
            "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false"]


def _command(*args: str) -> list[str]:
    """The installed ``ssl-lightning`` command (or ``python -m ssl_lightning.cli``) with ``args``."""
    exe = Path(sys.executable).with_name("ssl-lightning")
    return [*([str(exe)] if exe.exists() else [sys.executable, "-m", "ssl_lightning.cli"]), *args]


def _env(**extra: str) -> dict[str, str]:
    """This checkout first on PYTHONPATH (children import it, not an installed copy), one thread per process."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _scaled_lr(ckpt: dict) -> float:
    """The learning rate the optimizer started from (its non-probe groups all get the scaled one)."""
    groups = ckpt["optimizer_states"][0]["param_groups"]
    lrs = {g["initial_lr"] for g in groups if g.get("name") != "probe"}
    assert len(lrs) == 1, groups
    return lrs.pop()


def test_cli_ddp_two_processes_bf16_tensorboard(tmp_path):
    """`--trainer.devices 2 --trainer.strategy ddp --trainer.precision bf16-mixed` through the real
    command (Lightning re-launches it per process), with the TensorBoard logger selected."""
    run_dir = tmp_path / "ddp"
    cmd = _command(*TINY_DDP, "--trainer.devices", "2", "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2",
                   "--trainer.val_check_interval", "2",
                   "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir", ".",
                   "--run_dir", str(run_dir))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "global batch 16 / 256" in log  # 8 per process x 2 processes
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert glob.glob(str(run_dir / "lightning_logs" / "version_0" / "events.out.tfevents.*"))


def test_cli_two_nodes_one_process_each(tmp_path):
    """Two "nodes" on localhost, each launching its own process as a node of a cluster does (Lightning's
    LightningEnvironment: MASTER_ADDR, MASTER_PORT, NODE_RANK; ``--trainer.num_nodes 2 --trainer.devices 1``,
    gloo on CPU): both finish, form one world of 2, and the learning rate is scaled by the global batch of
    both nodes (2 x 8 images)."""
    run_dir = tmp_path / "nodes"
    cmd = _command(*TINY_DDP, "--trainer.num_nodes", "2", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                   "--trainer.logger", "false", "--run_dir", str(run_dir))
    port = str(free_port())
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)))
             for rank in range(2)]
    try:
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank}:\n{log[-3000:]}"
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in log, log[-3000:]
    assert "learning rate 0.3 per 256 images x global batch 16 / 256 = 0.01875" in logs[0]  # printed by rank 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and _scaled_lr(ckpt) == pytest.approx(0.3 * 16 / 256)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["num_nodes"] == 2
