"""Shared scaffolding for the exact-resume tests: a run of 2 epochs that never stops must equal a run interrupted
(after its first epoch, or mid-epoch by a step checkpoint or a preemption signal), checkpointed, and resumed into a
fresh (deliberately perturbed) model, bit for bit."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import lightning as L
import pytest
import torch

from ssl_lightning.callbacks import PreemptionCheckpoint


class StopAfterFirstEpoch(L.Callback):
    """Interrupts a run configured for 2 epochs (schedules keep their 2-epoch length)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


class StopAt(L.Callback):
    """Interrupts a run after global step ``step``, in ``on_train_batch_end``: stops it, or with ``signum`` has
    ``kill`` send that signal to its own process and its loader workers, as schedulers do (a
    :class:`PreemptionCheckpoint` then saves and the fit raises ``SystemExit``). From another process: torch's
    workers take a SIGTERM from their parent as a request to exit quietly, and die of anyone else's."""

    def __init__(self, step: int, signum: int | None = None) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.signum is None:
                trainer.should_stop = True
            else:
                pids = [os.getpid()] + [worker.pid for worker in multiprocessing.active_children()]
                subprocess.run(["kill", f"-{self.signum}", *map(str, pids)], check=True)


class BatchLog(L.Callback):
    """Per training batch: epoch, batch index, global step, learning rate, the samples and a checksum of the views.
    The interrupted run's log followed by the resumed run's must be the straight run's."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if isinstance(batch, dict):  # SemiSupervisedDataModule: labelled (x, y, idx), unlabelled (views, idx)
            views, index = [batch["labelled"][0]], batch["labelled"][2]
            if "unlabelled" in batch:
                views, index = views + list(batch["unlabelled"][0]), torch.cat([index, batch["unlabelled"][1]])
        else:
            views, index = batch[0][:1], batch[2]
        self.rows.append((trainer.current_epoch, batch_idx, trainer.global_step,
                          trainer.optimizers[0].param_groups[0]["lr"], tuple(index.tolist()),
                          float(sum(v.double().sum() for v in views))))


def trainer(max_epochs: int = 2, callbacks: Sequence[L.Callback] = (), **trainer_kwargs) -> L.Trainer:
    """Deterministic CPU trainer without logger, checkpoints, progress bar or validation; ``trainer_kwargs`` go to
    the ``Trainer`` (gradient clipping, logging frequency...)."""
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     deterministic=True, callbacks=list(callbacks), **trainer_kwargs)


def fit(model: L.LightningModule, data: L.LightningDataModule, ckpt_path: str | Path | None = None,
        interrupt: bool = False, max_epochs: int = 2, callbacks: Sequence[L.Callback] = (),
        **trainer_kwargs) -> L.Trainer:
    """:func:`trainer`'s fit; ``interrupt`` stops it after the first epoch."""
    callbacks = list(callbacks) + ([StopAfterFirstEpoch()] if interrupt else [])
    t = trainer(max_epochs, callbacks, **trainer_kwargs)
    t.fit(model, data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return t


def perturb_first_parameter(model: torch.nn.Module) -> None:
    torch.nn.init.normal_(next(model.parameters()))


class ResumeRuns(NamedTuple):
    straight: L.LightningModule  # 2 epochs without stopping
    resumed: L.LightningModule  # perturbed fresh model, resumed from the interrupted run's checkpoint
    first: L.LightningModule  # the interrupted run (1 epoch, or up to stop_at)
    t_straight: L.Trainer
    t_resumed: L.Trainer
    t_first: L.Trainer
    checkpoint: dict  # the interrupted run's checkpoint
    log: list[tuple]  # BatchLog rows of the straight run


def assert_state_dicts_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def check_resume_is_exact(make_model: Callable[[], L.LightningModule], make_data: Callable[[], L.LightningDataModule],
                          tmp_path: Path, perturb: Callable[[L.LightningModule], None] | None = perturb_first_parameter,
                          max_epochs: int = 2, straight_callbacks: Sequence[L.Callback] = (),
                          stop_at: int | None = None, signum: int | None = None, **trainer_kwargs) -> ResumeRuns:
    """Fits ``make_model()`` for ``max_epochs`` straight; fits another and interrupts it, with a checkpoint; perturbs a
    third with ``perturb`` (restored state must not depend on the fresh model's) and resumes it.

    The interruption: ``stop_at`` None: after the first epoch (checkpoint saved after ``fit``); ``stop_at=k``: after
    global step k (mid-epoch, or on an epoch's last batch), the checkpoint saved by :class:`PreemptionCheckpoint`: by its periodic save
    (``every_n_train_steps=k``, in ``on_train_batch_end``, where ``ModelCheckpoint`` saves too), or on ``signum``
    (SIGTERM, SIGUSR1) sent to the process there, and then the ``fit`` must end in ``SystemExit(128 + signum)``.

    Asserts: the interrupted run stopped where asked, the resumed run reached the straight run's global step, the
    perturbation changed the fresh model, every state-dict entry (parameters, buffers, teachers, queues, probe) and
    the optimizer's state and hyperparameters are bit-identical, the interrupted run's batches followed by the
    resumed run's are the straight run's (epoch, batch index, step, learning rate, samples, views), and the global
    torch RNG ends in the same state. Returns the runs for method-specific checks.
    """
    log_straight, log_first, log_resumed = BatchLog(), BatchLog(), BatchLog()
    straight = make_model()
    t_straight = fit(straight, make_data(), max_epochs=max_epochs, callbacks=[*straight_callbacks, log_straight],
                     **trainer_kwargs)
    rng_straight = torch.get_rng_state()
    assert t_straight.global_step > 0 and t_straight.global_step % max_epochs == 0
    per_epoch = t_straight.global_step // max_epochs

    first = make_model()
    ckpt = tmp_path / ("epoch1.ckpt" if stop_at is None else "mid_epoch.ckpt")
    if stop_at is None:
        t_first = fit(first, make_data(), interrupt=True, max_epochs=max_epochs, callbacks=[log_first],
                      **trainer_kwargs)
        assert t_first.current_epoch == 1 and t_first.global_step == per_epoch
        t_first.save_checkpoint(ckpt)
    else:
        assert 0 < stop_at < t_straight.global_step
        callbacks = [log_first, StopAt(stop_at, signum), PreemptionCheckpoint(
            dirpath=str(tmp_path), filename=ckpt.name, every_n_train_steps=stop_at if signum is None else None)]
        t_first = trainer(max_epochs, callbacks, **trainer_kwargs)
        if signum is None:
            t_first.fit(first, make_data())
        else:
            with pytest.raises(SystemExit) as stopped:
                t_first.fit(first, make_data())
            assert stopped.value.code == 128 + signum
        assert t_first.global_step == stop_at and len(log_first.rows) == stop_at
    checkpoint = torch.load(ckpt, weights_only=True)  # loads without unpickling arbitrary objects
    assert checkpoint["global_step"] == t_first.global_step

    resumed = make_model()
    if perturb is not None:
        fresh = {k: v.clone() for k, v in resumed.state_dict().items()}
        perturb(resumed)
        assert any(not torch.equal(fresh[k], v) for k, v in resumed.state_dict().items()), "perturb changed nothing"
    t_resumed = fit(resumed, make_data(), ckpt_path=ckpt, max_epochs=max_epochs, callbacks=[log_resumed],
                    **trainer_kwargs)
    rng_resumed = torch.get_rng_state()

    assert t_resumed.global_step == t_straight.global_step
    assert log_first.rows + log_resumed.rows == log_straight.rows
    assert_state_dicts_identical(straight.state_dict(), resumed.state_dict())
    opt_a, opt_b = t_straight.optimizers[0].state_dict(), t_resumed.optimizers[0].state_dict()
    assert len(opt_a["state"]) == len(opt_b["state"]) > 0
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        assert state.keys() == opt_b["state"][i].keys()
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][i][name], rtol=0, atol=0, msg=f"optimizer state {i} {name}")
    assert opt_a["param_groups"] == opt_b["param_groups"]  # lr, weight decay, momentum... and the parameter ids
    assert torch.equal(rng_straight, rng_resumed), "the global RNG is not where the straight run left it"
    return ResumeRuns(straight, resumed, first, t_straight, t_resumed, t_first, checkpoint, log_straight.rows)
