"""Preemption: on SIGTERM or SIGUSR1, finish the current batch, save a checkpoint and exit like a killed process;
optionally refresh that checkpoint every N steps or minutes, so that even a hard kill loses little."""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from datetime import timedelta
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ssl_lightning.resume import next_batch_position


class PreemptionCheckpoint(L.Callback):
    """Saves a checkpoint when the job is told to stop (SIGTERM, or SIGUSR1: what SLURM, Kubernetes and cloud
    schedulers send before they kill a job), prints where it is and how to resume, and exits with
    ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1), the status of a process killed by that signal.

    In one process the stopping is Lightning's: its SIGTERM handler sets ``trainer.received_sigterm`` and the
    loops raise ``SIGTERMException`` (a ``SystemExit``) once the current batch (or validation batch) is done;
    this callback saves in ``on_exception`` and sets the exit status. SIGUSR1, which Lightning ignores outside
    SLURM, is turned into a SIGTERM. Under DDP Lightning 2.6's handler is not safe: it runs a collective inside
    the handler and its loops raise on a process's own flag, so processes reached at different moments (or
    twice: a group kill plus Lightning's forwarding) hang. There this callback takes both signals over during
    fit, only notes them, and at the end of every training batch all processes agree (a max-reduce of the
    signal number: the signal may reach any of them), save and raise the ``SIGTERMException`` together (saving
    first also works with ``ddp_spawn``, where Lightning calls no ``on_exception`` in the processes). The state
    saved is the one a ``ModelCheckpoint(every_n_train_steps)`` saves (the methods apply the EMA update still
    due when they resume). A stop asked for during validation takes effect after it.

    Under SLURM with auto-requeue Lightning handles SIGUSR1 itself (an ``hpc_ckpt_*.ckpt`` in the run directory
    and a requeue; the requeued job resumes from it if it starts in the same directory without ``ckpt_path``):
    this callback then leaves SIGUSR1 alone and still saves on SIGTERM.

    With ``every_n_train_steps`` or ``train_time_interval`` the same file is also saved in the middle of epochs
    (after every N optimizer steps, or after the first batch that ends once the interval has passed since the
    last save), for kills that give no warning (SIGKILL, a node failure). The checkpoint is written to a
    temporary file and renamed, so a kill during the write leaves the previous one intact. A run resumed from
    it continues at the next batch, exactly (see :mod:`ssl_lightning.resume`).

    Args:
        dirpath: the directory; default the ``ModelCheckpoint``'s, else ``<default_root_dir>/checkpoints``.
        filename: default ``last.ckpt``, the ``ModelCheckpoint``'s last checkpoint (it overwrites it at the end of
            each epoch): ``--ckpt_path <dir>/last.ckpt`` always resumes from the newest state.
        resume_command: the shell command printed, with ``{ckpt}``, ``{config}`` (``<run_dir>/config.yaml``) and
            ``{run_dir}``; default the Python call ``trainer.fit(model, datamodule, ckpt_path=...)``.
        every_n_train_steps / train_time_interval: periodic saves within epochs (default none).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt", resume_command: str | None = None,
                 every_n_train_steps: int | None = None, train_time_interval: timedelta | None = None) -> None:
        self.dirpath, self.filename, self.resume_command = dirpath, filename, resume_command
        self.every_n_train_steps, self.train_time_interval = every_n_train_steps, train_time_interval
        self._signal: int | None = None  # the first signal received (None: a SIGTERM that Lightning handled)
        self._distributed = False
        self._previous: dict[int, Any] = {}  # the handlers this callback replaced
        self._last_save = (-1, 0.0)  # global step and time of the last periodic save

    # ---- signals ----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._signal, self._distributed, self._previous = None, trainer.world_size > 1, {}

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over_signals()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_save = (trainer.global_step, time.monotonic())
        self._take_over_signals()

    def _take_over_signals(self) -> None:
        # after Lightning installed its handlers (which restores the ones from before the fit at its teardown)
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        # SIGUSR1 is ours only if nobody handles it (Lightning's SLURM auto-requeue handler, a user's)
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 is not None and signal.getsignal(usr1) == signal.SIG_DFL:
            self._previous[usr1] = signal.signal(usr1, self._on_signal)
        if self._distributed:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = self._signal or signum
        if not self._distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # SIGUSR1 -> Lightning's SIGTERM path: stop after this batch

    def _stop_if_any_process_was_signalled(self, trainer: L.Trainer) -> None:
        if not self._distributed:
            return
        mine = torch.tensor(self._signal or 0, device=trainer.strategy.root_device)
        signum = int(trainer.strategy.reduce(mine, reduce_op="max"))
        if signum:  # every process, after the same batch: save here (with ddp_spawn Lightning calls no
            self._signal = signum  # on_exception in the processes) and leave as Lightning would
            self._save_and_say(trainer)
            stop = SIGTERMException()
            stop.code = 128 + signum
            raise stop

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}  # after an exception Lightning's teardown restores the handlers from before the fit

    # ---- periodic saves -------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_if_any_process_was_signalled(trainer)
        step, since = self._last_save
        if trainer.global_step == step or trainer.fast_dev_run:  # no optimizer step since (accumulation), or saved
            return
        due = bool(self.every_n_train_steps) and trainer.global_step % self.every_n_train_steps == 0
        if self.train_time_interval is not None:  # rank 0's clock decides, so that every process saves
            elapsed = time.monotonic() - since >= self.train_time_interval.total_seconds()
            due = trainer.strategy.broadcast(due or elapsed)
        if due:
            self.save(trainer)
            self._last_save = (trainer.global_step, time.monotonic())

    # ---- the save -----------------------------------------------------------------------------------------------
    def checkpoint_path(self, trainer: L.Trainer) -> str:
        dirpath = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        return os.path.join(dirpath or os.path.join(trainer.default_root_dir, "checkpoints"), self.filename)

    def save(self, trainer: L.Trainer) -> str:
        """Saves :meth:`checkpoint_path` (every process calls it) through a temporary file; returns the path."""
        path = self.checkpoint_path(trainer)
        last = trainer.checkpoint_callback
        if (isinstance(last, ModelCheckpoint) and last.dirpath is not None and os.path.abspath(path)
                == os.path.abspath(os.path.join(last.dirpath, last.CHECKPOINT_NAME_LAST + last.FILE_EXTENSION))):
            # the file is the ModelCheckpoint's last.ckpt from now on, also in the state saved with it: it (and a
            # resumed run's) overwrites it instead of starting a last-v1.ckpt
            last.last_model_path = path
        local = "://" not in path
        trainer.save_checkpoint(path + ".tmp" if local else path)  # every process: it synchronises them
        if trainer.is_global_zero and local:
            os.replace(path + ".tmp", path)
        trainer.strategy.barrier("PreemptionCheckpoint")  # no process goes on (or exits) before the file is in place
        return path

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        signum = self._signal or signal.SIGTERM
        if exception.code is None:
            exception.code = 128 + signum
        if self._distributed:  # saved before raising (or stopped by Lightning before this callback took over)
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            if trainer.is_global_zero:
                when = "during the sanity check" if trainer.sanity_checking else "outside training"
                _say(f"Stopped by {signal.Signals(signum).name} {when}: no checkpoint saved.")
            return
        self._save_and_say(trainer)

    def _save_and_say(self, trainer: L.Trainer) -> None:
        path = self.save(trainer)
        if trainer.is_global_zero:
            epoch, done = next_batch_position(trainer)
            where = (f"epoch {epoch} after batch {done} of {trainer.num_training_batches}" if done
                     else f"the start of epoch {epoch}")
            _say(f"Stopped by {signal.Signals(self._signal or signal.SIGTERM).name} at {where} (global step "
                 f"{trainer.global_step}): saved {path}; resume with: {self._resume_hint(trainer, path)}")
        trainer.strategy.barrier("PreemptionCheckpoint message")

    def _resume_hint(self, trainer: L.Trainer, path: str) -> str:
        if self.resume_command is None:
            return f"trainer.fit(model, datamodule, ckpt_path={path!r})"
        run_dir = trainer.default_root_dir
        return self.resume_command.format(ckpt=shlex.quote(path), run_dir=shlex.quote(run_dir),
                                          config=shlex.quote(os.path.join(run_dir, "config.yaml")))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
