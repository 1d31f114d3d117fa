"""A loss that becomes NaN or inf stops the run with one clear message, and no checkpoint is written after it.

:class:`NonFiniteGuard` is driven by the hooks of a LightningModule (``SSLMethod`` wires it into its own
hooks, so it works with the ``ssl-lightning`` CLI and with a plain ``L.Trainer``):

- ``training_step``: :meth:`~NonFiniteGuard.observe` the loss terms (device-side tensor ops only);
- ``on_train_start`` / ``on_train_end``: :meth:`~NonFiniteGuard.start` / :meth:`~NonFiniteGuard.finish`;
- ``on_train_batch_end``: :meth:`~NonFiniteGuard.after_batch` (the check every ``log_every_n_steps`` batches);
- ``on_before_optimizer_step``: :meth:`~NonFiniteGuard.drop_update` (skip mode);
- ``on_validation_start`` / ``on_save_checkpoint``: :meth:`~NonFiniteGuard.check`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ssl_lightning import distributed
from ssl_lightning.registry import SSLError

NonFiniteMode = Literal["stop", "skip"]
_NONE = -1  # "no non-finite step yet" in the device-side record
_WARN_FIRST, _WARN_EVERY = 10, 100  # skip mode: a warning for each of the first 10 skipped steps, then every 100th


class NonFiniteLossError(SSLError):
    """The loss (or one of its terms) became NaN or inf; the message names the step, the terms, the learning
    rate and the usual fixes."""


class NonFiniteGuard:
    """Detects non-finite loss terms and stops the run (``mode="stop"``) or skips their updates (``"skip"``).

    Stop mode never waits on the device during a step: every step folds "is a term NaN / inf" into a small
    device tensor that keeps the FIRST bad step (its step, epoch and which terms were NaN or inf). That record
    is read back, gathered over all processes so that every rank takes the same decision, every
    ``trainer.log_every_n_steps`` batches, before validation, before every checkpoint is written and at the
    end of training; a bad record raises :class:`NonFiniteLossError`. Raising while a checkpoint is being
    saved aborts the write, so the newest checkpoint on disk predates the bad step. Before a checkpoint is
    written the model's state (parameters and buffers) is also checked for NaN / inf, which catches weights
    that an update made non-finite before any loss was computed with them.

    Skip mode needs a read-back after every step (one device sync per step, as AMP's GradScaler does for its
    inf check), gathered over all processes: a step with a non-finite term has its gradients discarded before
    the optimizer step, so parameters and optimizer state (momentum, Adam moments) stay as they were, and
    :attr:`update_dropped` tells the module to skip its EMA teacher update. The step still counts (the
    learning-rate schedule advances). The skipped steps are counted (``train/skipped_steps``) and warned
    about (each of the first 10, then every 100th). Buffers that the forward pass updates (BatchNorm running
    statistics, queues, memory banks) are not rolled back: if they became non-finite, the steps after are
    non-finite too, and ``max_consecutive_skips`` non-finite steps in a row stop the run (0: never), as does
    a checkpoint of a non-finite state.

    Args:
        mode: ``"stop"`` or ``"skip"``.
        max_consecutive_skips: skip mode: stop after this many non-finite steps in a row (0 = never).
        prefix: put before the term names in messages (the names under which the module logs them).
    """

    def __init__(self, mode: NonFiniteMode = "stop", max_consecutive_skips: int = 10, prefix: str = "train/") -> None:
        if mode not in ("stop", "skip"):
            raise SSLError(f"on_nonfinite must be 'stop' or 'skip', not {mode!r}.")
        if max_consecutive_skips < 0:
            raise SSLError(f"max_consecutive_skips must be >= 0 (0 = never stop), not {max_consecutive_skips}.")
        self.mode, self.max_consecutive_skips, self.prefix = mode, max_consecutive_skips, prefix
        self.names: list[str] = []  # term names, in order of first appearance: bit i of the masks is names[i]
        self.skipped_steps = 0  # skip mode: optimizer steps whose update was dropped (this fit)
        self.update_dropped = False  # whether the latest optimizer step's update was dropped
        self._active = False
        self._reset()

    def _reset(self) -> None:
        self._record: torch.Tensor | None = None  # [first bad step or -1, its epoch, nan mask, inf mask]
        self._lrs: dict[int, Any] = {}  # learning rate per step since the last check (as the optimizer holds it)
        self._batches = 0  # batches since the last check
        self._skip_pending = False
        self._consecutive: list[tuple] = []  # skip mode: (step, epoch, nan, inf, rank) of the current run of bad steps
        self._weights: dict[tuple[int, ...], torch.Tensor] = {}

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """A fit begins: forget earlier fits' records."""
        self._reset()
        self.skipped_steps, self.update_dropped, self._active = 0, False, True

    def finish(self, module: L.LightningModule) -> None:
        """Training ended: a last check (a bad step after the last interval), then later saves are not checked."""
        self.check(module)
        self._active = False

    # ---- every step ---------------------------------------------------------------------------------------
    def observe(self, module: L.LightningModule, terms: Mapping[str, Any]) -> None:
        """Folds this step's ``terms`` (name -> scalar; the loss and its logged parts) into the record (stop
        mode: no read-back), or decides at once whether to drop this step's update (skip mode: one read-back)."""
        if not self._active or not terms:
            return
        trainer = module.trainer
        step = trainer.global_step
        lr = _learning_rate(trainer)
        self._lrs[step] = lr.detach().clone() if torch.is_tensor(lr) else lr  # schedulers update tensors in place
        device = module.device
        index = tuple(self._index(name) for name in terms)
        values = torch.stack([torch.as_tensor(v).detach().to(device=device, dtype=torch.float32).reshape(())
                              for v in terms.values()])
        bits = self._bits(index, device)
        nan = (values.isnan().long() * bits).sum()
        inf = (values.isinf().long() * bits).sum()
        row = torch.stack([torch.full_like(nan, step), torch.full_like(nan, trainer.current_epoch), nan, inf])
        if self.mode == "skip":
            self._decide_skip(module, row)
            return
        if self._record is None:
            self._record = torch.full_like(row, _NONE)
        first = (self._record[0] == _NONE) & ((nan | inf) != 0)
        self._record = torch.where(first, row, self._record)

    def after_batch(self, module: L.LightningModule) -> None:
        """The interval check (stop mode): every ``trainer.log_every_n_steps`` batches."""
        if not self._active or self.mode != "stop":
            return
        self._batches += 1
        if self._batches >= (module.trainer.log_every_n_steps or 50):
            self.check(module)

    def drop_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip mode: discards the gradients of a step with a non-finite term, so ``optimizer.step()`` changes
        neither the parameters nor its state (optimizers leave parameters without ``.grad`` alone)."""
        self.update_dropped = self._skip_pending
        if self._skip_pending:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._skip_pending = False

    # ---- checks ---------------------------------------------------------------------------------------------
    def check(self, module: L.LightningModule, state: Mapping[str, Any] | None = None) -> None:
        """Reads back the record (one read-back, gathered over all processes) and raises
        :class:`NonFiniteLossError` if a step had a non-finite term, or if ``state`` (the state dict about to
        be saved) holds NaN / inf. Every process must call it at the same point (all Lightning hooks do)."""
        if not self._active:
            return
        device = module.device
        record = self._record if self._record is not None else torch.full((4,), _NONE, dtype=torch.long, device=device)
        tensors = [(k, v) for k, v in (state or {}).items() if torch.is_tensor(v) and v.is_floating_point()]
        finite = torch.stack([torch.isfinite(v).all().to(device) for _, v in tensors]) if tensors \
            else torch.ones(0, dtype=torch.bool, device=device)
        row = torch.cat([record.to(device), (~finite).sum().reshape(1)])
        rows, finite = self._read(row, finite)
        self._batches = 0
        bad = [(r[0], rank, r) for rank, r in enumerate(rows) if r[0] != _NONE]
        if bad:
            _, rank, (step, epoch, nan, inf, _) = min(bad)
            raise NonFiniteLossError(self._stop_message(module, step, epoch, nan, inf, rank if len(rows) > 1 else None))
        broken = [rank for rank, r in enumerate(rows) if r[4]]
        if broken:
            names = [k for (k, _), ok in zip(tensors, finite) if not ok]
            raise NonFiniteLossError(self._state_message(module, names, broken if len(rows) > 1 else None))
        if self.mode == "stop":  # (skip mode keeps the learning rates of its current run of skipped steps)
            self._lrs = {}

    def _read(self, row: torch.Tensor, local: torch.Tensor) -> tuple[list[list[int]], list[bool]]:
        """The one read-back of a check: every process's ``row`` and this process's ``local`` flags."""
        rows = distributed.gather(row[None])
        flat = torch.cat([rows.flatten(), local.long()]).tolist()
        width = row.numel()
        n = rows.shape[0] * width
        return [flat[i:i + width] for i in range(0, n, width)], [bool(x) for x in flat[n:]]

    def _decide_skip(self, module: L.LightningModule, row: torch.Tensor) -> None:
        rows, _ = self._read(row, torch.ones(0, dtype=torch.bool, device=row.device))
        bad = [(rank, r) for rank, r in enumerate(rows) if r[2] or r[3]]
        if not bad:
            self._consecutive, self._lrs = [], {}
        else:
            rank, (step, epoch, nan, inf) = bad[0]
            rank = rank if len(rows) > 1 else None
            self._consecutive.append((step, epoch, nan, inf, rank))
            if not self._skip_pending:  # several bad micro-batches of one accumulated step: one skipped step
                self.skipped_steps += 1
                self._skip_pending = True
            run, limit = len(self._consecutive), self.max_consecutive_skips
            if limit and run >= limit:
                raise NonFiniteLossError(self._stop_message(module, *self._consecutive[0], skipped=run))
            n = self.skipped_steps
            if n <= _WARN_FIRST or n % _WARN_EVERY == 0:
                where = f" on rank {rank}" if rank is not None else ""
                more = f"; from now on every {_WARN_EVERY}th skipped step is reported" if n == _WARN_FIRST else ""
                rank_zero_warn(f"Step {step}: {self._terms(nan, inf)}{where}; its update was skipped "
                               f"(on_nonfinite=skip; {n} skipped so far, logged as {self.prefix}skipped_steps{more}).")
        module.log(f"{self.prefix}skipped_steps", float(self.skipped_steps))

    # ---- messages --------------------------------------------------------------------------------------------
    def _index(self, name: str) -> int:
        if name not in self.names:
            if len(self.names) >= 62:
                raise SSLError("NonFiniteGuard watches at most 62 loss terms; log the others without the guard.")
            self.names.append(name)
        return self.names.index(name)

    def _bits(self, index: tuple[int, ...], device: torch.device) -> torch.Tensor:
        bits = self._weights.get(index)
        if bits is None or bits.device != device:
            bits = self._weights[index] = torch.tensor([1 << i for i in index], device=device)
        return bits

    def _terms(self, nan: int, inf: int) -> str:
        """``train/loss and train/align were nan, train/x was inf`` from the masks."""
        parts = []
        for mask, kind in ((nan, "nan"), (inf, "inf")):
            names = [f"{self.prefix}{name}" for i, name in enumerate(self.names) if mask >> i & 1]
            if names:
                listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
                parts.append(f"{listed} {'was' if len(names) == 1 else 'were'} {kind}")
        return ", ".join(parts)

    def _stop_message(self, module: L.LightningModule, step: int, epoch: int, nan: int, inf: int,
                      rank: int | None, skipped: int = 0) -> str:
        trainer, newest = module.trainer, _newest_checkpoint(module.trainer)
        lr = self._lrs.get(step)
        lr = None if lr is None else float(lr)
        where = f"epoch {epoch}" + (f", rank {rank}" if rank is not None else "") + \
            (f", learning rate {lr:.4g}" if lr is not None else "")
        bad = f"{self._terms(nan, inf)} at step {step} ({where})"
        if skipped:
            return (f"Training stopped at step {trainer.global_step}: {skipped} non-finite steps in a row "
                    f"(on_nonfinite=skip, max_consecutive_skips={self.max_consecutive_skips}), the first: {bad}. "
                    "The skipped steps did not change the weights" + (f"; the newest checkpoint is {newest}. "
                    if newest else ". ") + _fixes(module, self.mode))
        return (f"Training stopped at step {trainer.global_step}: {bad}. No checkpoint was written after that step"
                + (f"; the newest, {newest}, is from before it. " if newest else ". ") + _fixes(module, self.mode))

    def _state_message(self, module: L.LightningModule, names: list[str], ranks: list[int] | None) -> str:
        trainer, newest = module.trainer, _newest_checkpoint(module.trainer)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        where = f" on rank {', '.join(map(str, ranks))}" if ranks else ""
        lr = _learning_rate(trainer)
        at = f", learning rate {float(lr):.4g}" if lr is not None else ""
        return (f"Training stopped at step {trainer.global_step}: the model's state became non-finite{where} "
                f"({shown or 'on another rank'}){at}. This checkpoint was not written"
                + (f"; the newest is {newest}. " if newest else ". ") + _fixes(module, self.mode))


def _learning_rate(trainer: L.Trainer) -> Any:
    """The first parameter group's learning rate (SSLMethod: the scaled base rate; the probe's group is last),
    as the optimizer holds it (not converted: a tensor learning rate would be a device read)."""
    optimizers = trainer.optimizers
    return optimizers[0].param_groups[0]["lr"] if optimizers else None


def _newest_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint the trainer's ModelCheckpoint wrote, if any (it records a path before writing the
    file, so an aborted write leaves a path without a file)."""
    ckpt = trainer.checkpoint_callback
    paths = [ckpt.last_model_path, ckpt.best_model_path] if ckpt is not None else []
    return next((p for p in paths if p and os.path.isfile(p)), None)


def _fixes(module: L.LightningModule, mode: str) -> str:
    hp = module.hparams
    now = lambda key: f" (now {hp[key]:g})" if isinstance(hp.get(key), (int, float)) else ""  # noqa: E731
    skip = "; or --model.init_args.on_nonfinite skip to skip such steps" if mode == "stop" else ""
    return (f"Usual fixes: a lower --model.init_args.lr{now('lr')}, a longer --model.init_args.warmup_epochs"
            f"{now('warmup_epochs')}, --trainer.precision 32-true or bf16-mixed instead of 16-mixed, "
            f"--trainer.gradient_clip_val (e.g. 1.0){skip}.")
