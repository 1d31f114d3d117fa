"""Preemption and mid-epoch resume: a run stopped by a step checkpoint, SIGTERM or SIGUSR1 in the middle of an
epoch and resumed equals the run that never stopped, bit for bit, in-process and through the real command."""
from __future__ import annotations

import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from ssl_lightning import SSLDataModule
from ssl_lightning.callbacks import PreemptionCheckpoint
from ssl_lightning.methods import BYOL, WMSE, MoCoV2, SimCLR

from resume_utils import check_resume_is_exact  # tests/ is on sys.path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class NoisySimCLR(SimCLR):
    """SimCLR whose loss draws from the global torch RNG (dropout on the features): exact only if the resumed run
    continues the RNG where the interrupted one stopped."""

    def loss(self, feats, views, index):
        return super().loss([F.dropout(f, 0.5) for f in feats], views, index)


def _model(cls):
    def make():
        L.seed_everything(0)
        extra = dict(queue_size=16, momentum_base=0.9, proj_out=16) if cls is MoCoV2 else dict(proj_hidden=32)
        if cls is BYOL:
            extra.update(pred_hidden=32, momentum_base=0.9)
        if cls is WMSE:  # whitening of 8-sample sub-batches, 2 random permutations per step
            extra.update(emb=4, w_size=8, w_iter=2)
        elif cls is not MoCoV2:
            extra.update(proj_out=16)
        return cls(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10, optimizer="sgd",
                   lr=0.5, warmup_epochs=1, **extra)
    return make


def _data(num_workers: int = 0, augment: str = "workers"):
    # 32 images, batch 8: 4 steps per epoch, 8 in all
    return lambda: SSLDataModule("synthetic", batch_size=8, num_workers=num_workers, pin_memory=False, image_size=16,
                                 augment=augment, dataset_options={"size": 32, "image_size": 16, "channels": 1})


def _perturb(model) -> None:  # restored state must not depend on init (queue and teacher included)
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.data.zero_()
    torch.nn.init.normal_(next(model.parameters()))


@pytest.mark.parametrize("cls,workers,augment,stop_at,signum", [
    (NoisySimCLR, 0, "workers", None, None),  # end of epoch 0: the global RNG across the epoch boundary
    (NoisySimCLR, 0, "workers", 6, None),  # periodic save in epoch 1: batches 2-3 left, RNG
    (WMSE, 0, "workers", 6, None),  # a method whose loss draws from the global RNG (W-MSE's permutations)
    (MoCoV2, 0, "workers", 6, None),  # periodic save: queue, key encoder, the EMA update still to come
    (MoCoV2, 0, "workers", 4, None),  # periodic save on the epoch's last batch, before the epoch ends
    (SimCLR, 2, "workers", None, None),  # loader workers draw the resumed epoch's first batches before set_epoch
    (BYOL, 2, "device", 5, signal.SIGTERM),  # preempted (workers signalled too), views made on the device
    (MoCoV2, 0, "workers", 5, signal.SIGUSR1),  # preempted by SIGUSR1
], ids=["rng-epoch-end", "rng-periodic", "wmse-periodic", "mocov2-periodic", "mocov2-periodic-last-batch", "workers-epoch-end",
        "byol-workers-device-sigterm", "mocov2-sigusr1"])
def test_resume_from_any_checkpoint_is_exact(cls, workers, augment, stop_at, signum, tmp_path, recwarn):
    # parameters, buffers (BN, queue), teacher, probe, optimizer state, lr schedule, the batches' samples and views,
    # the global RNG: bit-identical to 2 epochs without stopping
    runs = check_resume_is_exact(_model(cls), _data(workers, augment), tmp_path, perturb=_perturb, stop_at=stop_at,
                                 signum=signum)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]  # Lightning knows the loader resumes
    position = runs.checkpoint["SSLDataModule"]
    if stop_at is None:
        assert (position["train_epoch"], position["train_batches_done"]) == (1, 0)
    else:  # epoch 1 of 4 steps, stop_at - 4 batches done (0: it starts): the resumed run trained only the rest
        assert (position["train_epoch"], position["train_batches_done"]) == (1, stop_at - 4)
        assert [(r[0], r[1]) for r in runs.log[stop_at:]] == [(1, b) for b in range(stop_at - 4, 4)]
    pending = runs.checkpoint["ssl_lightning"]["teacher_update_pending"]
    assert pending == (cls is MoCoV2 and stop_at is not None and signum is None)  # saved in on_train_batch_end
    if cls is MoCoV2:
        assert int(runs.straight.state_dict()["queue.filled"]) == 16


def test_the_data_position_is_used_once(tmp_path):
    """A restored position shapes the next training loader only (a later fit starts at epoch 0), and a resume
    with another batch size says that it is not the interrupted run."""
    data = _data()()
    data.setup("fit")
    data.load_state_dict({"train_epoch": 1, "train_batches_done": 3, "batch_size": 8, "world_size": 1})
    resumed, fresh = data.train_dataloader(), data.train_dataloader()
    assert (resumed.sampler.epoch, resumed.sampler.skip, len(resumed)) == (1, 24, 4)  # len: the whole epoch
    assert len(list(resumed)) == 1 and (fresh.sampler.epoch, fresh.sampler.skip, len(list(fresh))) == (0, 0, 4)
    other = SSLDataModule("synthetic", batch_size=4, num_workers=0, pin_memory=False, image_size=16,
                          dataset_options={"size": 32, "image_size": 16, "channels": 1})
    with pytest.warns(UserWarning, match="batch size x processes 4 x 1 instead of the checkpoint's 8 x 1"):
        other.load_state_dict({"train_epoch": 1, "train_batches_done": 3, "batch_size": 8, "world_size": 1})


def test_sigterm_in_the_sanity_check_saves_nothing(tmp_path, capfd):
    """Before the first training step there is nothing to resume: exit 143, no checkpoint."""
    class SigtermInValidation(L.Callback):
        def on_validation_batch_end(self, trainer, *args):
            os.kill(os.getpid(), signal.SIGTERM)

    data = SSLDataModule("synthetic", batch_size=8, eval_batch_size=8, val_subset=32, num_workers=0, pin_memory=False,
                         image_size=16, dataset_options={"size": 32, "image_size": 16, "channels": 1})
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2,
                        callbacks=[SigtermInValidation(), PreemptionCheckpoint(dirpath=str(tmp_path))])
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(_model(SimCLR)(), data)
    assert stopped.value.code == 143 and trainer.global_step == 0
    assert "Stopped by SIGTERM during the sanity check: no checkpoint saved." in capfd.readouterr().err
    assert os.listdir(tmp_path) == []


class CountingSaves(PreemptionCheckpoint):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps: list[int] = []

    def save(self, trainer):
        self.steps.append(trainer.global_step)
        return super().save(trainer)


@pytest.mark.parametrize("trigger,steps", [({"every_n_train_steps": 3}, [3, 6]),
                                           ({"train_time_interval": timedelta(0)}, [1, 2, 3, 4, 5, 6, 7, 8])])
def test_periodic_saves(trigger, steps, tmp_path):
    saver = CountingSaves(dirpath=str(tmp_path), **trigger)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[saver])
    trainer.fit(_model(SimCLR)(), _data()())
    assert saver.steps == steps
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == steps[-1]
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_cli_gives_mid_epoch_saves_to_the_preemption_checkpoint(tmp_path, monkeypatch):
    """--checkpoint.every_n_train_steps / train_time_interval refresh last.ckpt within epochs and the ModelCheckpoint
    keeps its end-of-epoch saves; with a file name of one's own they stay plain ModelCheckpoint options."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ssl_lightning.cli import SSLCLI

    monkeypatch.chdir(tmp_path)
    base = ["--model", "simclr", "--data.dataset", "synthetic", "--trainer.logger", "false"]

    def callbacks(*extra):
        trainer = SSLCLI(args=base + list(extra), run=False).trainer  # no subcommand: instantiated, not run
        (saver,) = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
        return saver, trainer.checkpoint_callback

    saver, epochs = callbacks("--checkpoint.train_time_interval", "0:30:00")
    assert saver.train_time_interval == timedelta(minutes=30) and saver.every_n_train_steps is None
    assert isinstance(epochs, ModelCheckpoint) and epochs._every_n_epochs == 1 and epochs._train_time_interval is None
    saver, epochs = callbacks("--checkpoint.every_n_train_steps", "500")
    assert saver.every_n_train_steps == 500 and epochs._every_n_epochs == 1 and epochs._every_n_train_steps == 0
    assert saver.resume_command.startswith("ssl-lightning fit --config {config}")
    saver, steps = callbacks("--checkpoint.every_n_train_steps", "500", "--checkpoint.filename", "{step}")
    assert saver.every_n_train_steps is None and steps._every_n_train_steps == 500 and steps._every_n_epochs == 0


def test_loader_workers_outlive_a_schedulers_sigterm_but_not_their_loaders():
    """Schedulers signal every process of a job: a worker ignores another process's SIGTERM (and SIGUSR1) and keeps
    serving batches, while its parent can still stop it (``terminate()``), as with torch's own workers."""
    data = _data(num_workers=1)()
    data.setup("fit")
    batches = iter(data.train_dataloader())
    next(batches)
    (worker,) = multiprocessing.active_children()
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
    subprocess.run(["kill", "-USR1", str(worker.pid)], check=True)
    for _ in range(3):  # every remaining batch of the epoch
        next(batches)
    assert worker.is_alive()
    worker.terminate()
    worker.join(timeout=10)
    assert worker.exitcode == 0  # a quiet exit, not a death by signal


class SignalOneProcess(L.Callback):
    """Sends ``signum`` to the process of rank ``rank`` only, after global step ``step``."""

    def __init__(self, rank: int, step: int, signum: int) -> None:
        self.rank, self.step, self.signum = rank, step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_ddp_processes_stop_together_when_one_is_signalled(tmp_path, monkeypatch):
    """2 gloo processes, SIGTERM to rank 1 only, mid-epoch: both stop after the same batch (Lightning's own DDP
    handling would leave rank 0 running into the next step's collective), rank 0 saves, both exit with 143."""
    from lightning.pytorch.strategies import DDPStrategy

    from ddp_utils import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    data = SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         dataset_options={"size": 64, "image_size": 16, "channels": 1})  # 4 steps per epoch
    trainer = L.Trainer(accelerator="cpu", devices=2, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
                        callbacks=[SignalOneProcess(1, 5, signal.SIGTERM), PreemptionCheckpoint(dirpath=str(tmp_path))])
    with pytest.raises(torch.multiprocessing.ProcessExitedException) as stopped:
        trainer.fit(_model(MoCoV2)(), data)
    assert stopped.value.exit_code == 143
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["SSLDataModule"]["train_epoch"] == 1
    assert ckpt["SSLDataModule"]["train_batches_done"] == 1 and ckpt["SSLDataModule"]["world_size"] == 2
    assert ckpt["ssl_lightning"]["teacher_update_pending"]  # saved at the batch's end, before the EMA update


# ---- the real command: SIGTERM to an `ssl-lightning fit` process mid-epoch, then the printed resume command ---------
class MarkAndWait(L.Callback):
    """For the subprocess test: writes ``marker`` after global step ``step`` and then waits ``wait`` seconds after
    every step, so that the test's SIGTERM lands in the middle of epoch 1. Fires only in the run that reaches
    ``step`` (not in the resumed one, which starts after it)."""

    def __init__(self, marker: str, step: int, wait: float = 1.0) -> None:
        self.marker, self.step, self.wait, self.fired = marker, step, wait, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            self.fired = True
        if self.fired:
            time.sleep(self.wait)


def _exe() -> list[str]:
    exe = Path(sys.executable).with_name("ssl-lightning")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ssl_lightning.cli"]


def _command(run_dir: Path, *extra: str) -> list[str]:
    return _exe() + [
        "fit", "--model", "mocov2", "--model.backbone", "convnet", "--model.backbone_kwargs", "{width: 8}",
        "--model.queue_size", "16", "--model.proj_out", "16", "--model.lr", "0.5", "--model.warmup_epochs", "1",
        "--data.dataset", "synthetic", "--data.dataset_options", "{size: 48, channels: 1, image_size: 16}",
        "--data.image_size", "16", "--data.batch_size", "8", "--data.num_workers", "0", "--data.pin_memory", "false",
        "--data.eval_subset", "16", "--data.val_subset", "16", "--data.eval_batch_size", "16",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "2",
        "--trainer.logger", "false", "--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0", "--seed_everything", "0",
        "--checkpoint.every_n_train_steps", "5", "--run_dir", str(run_dir), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def test_sigterm_to_the_command_then_resume_equals_the_uninterrupted_run(tmp_path):
    # MoCo v2, 48 images / batch 8: 6 steps per epoch; SIGTERM once step 8 (epoch 1, batch 2) is done
    straight_dir, killed_dir, marker = tmp_path / "straight", tmp_path / "killed", tmp_path / "marker"
    straight = subprocess.Popen(_command(straight_dir), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    killed = subprocess.Popen(
        _command(killed_dir, "--trainer.callbacks+=test_preemption.MarkAndWait",
                 f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.step=8"),
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), killed.communicate()[0][-3000:]
    killed.send_signal(signal.SIGTERM)
    killed_log = killed.communicate(timeout=120)[0]
    straight_log = straight.communicate(timeout=120)[0]
    assert straight.returncode == 0, straight_log[-3000:]

    # exit status of a process killed by SIGTERM, one line saying what was saved and how to resume
    assert killed.returncode == 143, killed_log[-3000:]
    ckpt_dir = killed_dir / "checkpoints"
    lines = [line for line in killed_log.splitlines() if line.startswith("Stopped by SIGTERM")]
    assert len(lines) == 1, killed_log[-3000:]
    match = re.fullmatch(r"Stopped by SIGTERM at epoch 1 after batch (\d) of 6 \(global step (\d+)\): saved (\S+); "
                         r"resume with: (ssl-lightning fit --config \S+ --ckpt_path \S+)", lines[0])
    assert match, lines[0]
    done, step = int(match[1]), int(match[2])
    assert match[3] == str(ckpt_dir / "last.ckpt") and step == 6 + done and 2 <= done < 6
    assert sorted(os.listdir(ckpt_dir)) == ["epoch000.ckpt", "last.ckpt"]  # no .tmp left
    preempted = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert preempted["global_step"] == step
    assert preempted["SSLDataModule"]["train_epoch"] == 1 and preempted["SSLDataModule"]["train_batches_done"] == done

    saved = yaml.safe_load((killed_dir / "config.yaml").read_text())
    assert saved["checkpoint"]["every_n_train_steps"] == 5  # the resumed run saves mid-epoch too

    # the printed command resumes (same run directory)
    resume = shlex.split(match[4])
    assert resume[0] == "ssl-lightning"
    resume = _exe() + resume[1:]
    resumed = subprocess.run(resume, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert sorted(os.listdir(ckpt_dir)) == ["epoch001.ckpt", "last.ckpt"]  # still one last.ckpt (no last-v1)

    a = torch.load(straight_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("key_backbone.") for k in a["state_dict"]) and "queue.bank" in a["state_dict"]
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    assert all(torch.equal(opt_a[i][n], opt_b[i][n]) for i in opt_a for n in opt_a[i])
    assert a["lr_schedulers"] == b["lr_schedulers"]
