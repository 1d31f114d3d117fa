"""Every Trainer flag works with the CLI's defaults: the CLI's own callbacks (ModelCheckpoint, RichProgressBar,
LearningRateMonitor, KNNMonitor, ClusterMonitor) step aside when the user turns their feature off or brings
one of the same kind, and a setting Lightning refuses is one ``error:`` line (exit 2)."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

sys.path.insert(0, str(Path(__file__).parent))
import standins  # noqa: E402

from ssl_lightning.callbacks import ClusterMonitor, KNNMonitor  # noqa: E402
from ssl_lightning.cli import SSLCLI, main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["fit", "--model", "simclr", "--model.backbone", "convnet", "--model.backbone_kwargs", "{width: 8}",
        "--model.proj_hidden", "16", "--model.proj_out", "8", "--data.dataset", "synthetic",
        "--data.dataset_options", "{size: 32, channels: 1, image_size: 16}", "--data.batch_size", "8",
        "--data.eval_batch_size", "32", "--data.num_workers", "0", "--data.pin_memory", "false",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0", "--seed_everything", "0"]
KINDS = {"checkpoint": ModelCheckpoint, "bar": ProgressBar, "lr": LearningRateMonitor, "knn": KNNMonitor,
         "clusters": ClusterMonitor}
ALL = dict.fromkeys(KINDS, 1)
NONE = dict.fromkeys(KINDS, 0)
LAST = "run/checkpoints/last.ckpt"
OWN_CKPT = "--trainer.callbacks+=ModelCheckpoint"

# id: flags | callbacks of each kind in the Trainer | the user's own that must be there | the checkpoint the
# summary names (a glob; None: no checkpoint line) | whether validation metrics are reported
CASES = {
    "defaults": ([], ALL, None, LAST, True),
    "checkpointing off": (["--trainer.enable_checkpointing", "false"], {**ALL, "checkpoint": 0}, None, None, True),
    "progress bar off": (["--trainer.enable_progress_bar", "false"], {**ALL, "bar": 0}, None, LAST, True),
    "no logger": (["--trainer.logger", "false"], {**ALL, "lr": 0}, None, LAST, True),
    "own checkpoint": ([OWN_CKPT, "--trainer.callbacks.filename", "mine"], ALL,
                       lambda c: isinstance(c, ModelCheckpoint) and c.filename == "mine", "run/**/mine.ckpt", True),  # logger's dir
    "own progress bar": (["--trainer.callbacks+=TQDMProgressBar"], ALL,
                         lambda c: type(c).__name__ == "TQDMProgressBar", LAST, True),
    "own lr monitor": (["--trainer.callbacks+=LearningRateMonitor", "--trainer.callbacks.logging_interval", "epoch"], ALL,
                       lambda c: isinstance(c, LearningRateMonitor) and c.logging_interval == "epoch", LAST, True),
    "own knn monitor": (["--trainer.callbacks+=ssl_lightning.callbacks.KNNMonitor", "--trainer.callbacks.k", "5"], ALL,
                        lambda c: isinstance(c, KNNMonitor) and c.k == 5, LAST, True),
    "barebones": (["--trainer.logger", "false", "--trainer.barebones", "true"], NONE, None, None, False),
    "fast_dev_run": (["--trainer.fast_dev_run", "true"], ALL, None, LAST, True),  # saves last.ckpt, not config.yaml
    "max_steps": (["--trainer.max_steps", "1", "--trainer.max_epochs", "-1"], ALL, None, LAST, False),
    "no validation": (["--trainer.limit_val_batches", "0"], ALL, None, LAST, False),
    "model summary": (["--trainer.enable_model_summary", "true"], ALL, None, LAST, True),
    "unlabelled data": (["--data.dataset", "image_folder", "--data.root", "{flat}", "--data.dataset_options", "{}",
                         "--data.image_size", "16"], ALL, None, LAST, False),  # no probe, no kNN: nothing to score
    "default_root_dir": (["--trainer.default_root_dir", "run"], ALL, None, LAST, True),  # Lightning's name for --run_dir
}


@pytest.fixture
def fit(tmp_path, monkeypatch, capsys):
    """Runs ``ssl-lightning fit`` in-process in ``tmp_path``; returns the Trainer and what it printed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
    trainers = []
    original = SSLCLI.after_fit
    monkeypatch.setattr(SSLCLI, "after_fit", lambda cli: (trainers.append(cli.trainer), original(cli)))

    def run(flags: list[str]):
        capsys.readouterr()
        main(TINY + flags + ([] if "--trainer.default_root_dir" in flags else ["--run_dir", "run"]))
        return trainers[-1], capsys.readouterr().out

    return run


@pytest.mark.parametrize("case", CASES)
def test_trainer_flag_with_cli_defaults(case, fit, tmp_path):
    flags, kinds, own, checkpoint, metrics = CASES[case]
    flat = standins.write_flat_folder(tmp_path / "flat", n=16) if "{flat}" in flags else None
    trainer, out = fit([f.replace("{flat}", str(flat)) for f in flags])
    counts = {name: sum(isinstance(c, kind) for c in trainer.callbacks) for name, kind in KINDS.items()}
    assert counts == kinds
    assert own is None or any(own(c) for c in trainer.callbacks)  # the user's, not the CLI's
    assert "run directory : run" in out
    assert ("config        : run/config.yaml" in out) == (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file() != (case == "fast_dev_run")  # Lightning's CLI skips it there
    if checkpoint is None:
        assert "checkpoint" not in out and not (tmp_path / "run" / "checkpoints").exists()
    else:
        saved = [str(p.relative_to(tmp_path)) for p in tmp_path.glob(checkpoint)]
        assert len(saved) == 1 and f"checkpoint    : {saved[0]}" in out.replace(f"{tmp_path}/", ""), out
    assert ("final metrics : val/knn_top1" in out) == metrics


@pytest.mark.parametrize("flags, message", [
    (["--config", str(REPO / "experiments/fashion_mnist/simclr.yaml"), "--trainer.barebones", "true"],
     "these are set: trainer.logger=WandbLogger, trainer.log_every_n_steps=20. "
     "Add --trainer.logger false --trainer.log_every_n_steps 0"),
    (["--trainer.barebones", "true", "--trainer.enable_progress_bar", "true", "--trainer.logger", "false"],
     "these are set: trainer.enable_progress_bar=True. Add --trainer.enable_progress_bar false"),
    (["--trainer.enable_checkpointing", "false", OWN_CKPT],
     "Invalid trainer settings: Trainer was configured with `enable_checkpointing=False` but found `ModelCheckpoint`"),
    (["--trainer.num_nodes", "2"], "A multi-node run needs --run_dir"),
], ids=["barebones with the config's logger", "barebones with a progress bar", "own checkpoint, checkpointing off",
        "several nodes, no run_dir"])
def test_refused_settings_are_one_error_line(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("refused before training"))  # 2 nodes: no wait
    capsys.readouterr()
    run_dir = [] if "--trainer.num_nodes" in flags else ["--run_dir", "run"]
    with pytest.raises(SystemExit) as info:
        main(TINY + flags + run_dir)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def test_sync_batchnorm_on_cpu_uses_the_all_reduce_layers(tmp_path, monkeypatch):
    """torch's SyncBatchNorm refuses CPU tensors; on CPU the CLI gives the layers global-batch statistics with
    AllReduceSyncBatchNorm instead (the 2-process equality: tests/test_ddp.py)."""
    from ssl_lightning.cli import SSLCLI
    from ssl_lightning.modules import AllReduceSyncBatchNorm

    monkeypatch.chdir(tmp_path)
    cli = SSLCLI(run=False, args=["--model", "simclr", "--data.dataset", "synthetic", "--trainer.accelerator", "cpu",
                                  "--trainer.sync_batchnorm", "true", "--trainer.logger", "false", "--run_dir", "run"])
    assert isinstance(cli.trainer._accelerator_connector._layer_sync, AllReduceSyncBatchNorm)
