"""Shared scaffolding for the exact-resume tests: a run of 2 epochs that never stops must equal a run interrupted
after its first epoch, checkpointed, and resumed into a fresh (deliberately perturbed) model, bit for bit."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import lightning as L
import torch


class StopAfterFirstEpoch(L.Callback):
    """Interrupts a run configured for 2 epochs (schedules keep their 2-epoch length)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def fit(model: L.LightningModule, data: L.LightningDataModule, ckpt_path: str | Path | None = None,
        interrupt: bool = False, max_epochs: int = 2, callbacks: Sequence[L.Callback] = (),
        **trainer_kwargs) -> L.Trainer:
    """Deterministic CPU fit without logger, checkpoints, progress bar or validation; ``interrupt`` stops it after
    the first epoch; ``trainer_kwargs`` go to the ``Trainer`` (gradient clipping, logging frequency...)."""
    callbacks = list(callbacks) + ([StopAfterFirstEpoch()] if interrupt else [])
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        deterministic=True, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer


def perturb_first_parameter(model: torch.nn.Module) -> None:
    torch.nn.init.normal_(next(model.parameters()))


class ResumeRuns(NamedTuple):
    straight: L.LightningModule  # 2 epochs without stopping
    resumed: L.LightningModule  # perturbed fresh model, resumed from the end-of-epoch-1 checkpoint
    first: L.LightningModule  # the interrupted run (1 epoch)
    t_straight: L.Trainer
    t_resumed: L.Trainer
    t_first: L.Trainer


def assert_state_dicts_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def check_resume_is_exact(make_model: Callable[[], L.LightningModule], make_data: Callable[[], L.LightningDataModule],
                          tmp_path: Path, perturb: Callable[[L.LightningModule], None] | None = perturb_first_parameter,
                          max_epochs: int = 2, straight_callbacks: Sequence[L.Callback] = (),
                          **trainer_kwargs) -> ResumeRuns:
    """Fits ``make_model()`` for ``max_epochs`` straight; fits another for 1 epoch (interrupted), saves a checkpoint;
    perturbs a third with ``perturb`` (restored state must not depend on the fresh model's) and resumes it.

    Asserts: the interrupted run stopped after exactly one epoch, the resumed run reached the straight run's global
    step, the perturbation changed the fresh model, every state-dict entry (parameters, buffers, teachers, queues,
    probe) and the optimizer's state and hyperparameters are bit-identical. Returns the runs for method-specific checks.
    """
    straight = make_model()
    t_straight = fit(straight, make_data(), max_epochs=max_epochs, callbacks=straight_callbacks, **trainer_kwargs)
    assert t_straight.global_step > 0 and t_straight.global_step % max_epochs == 0

    first = make_model()
    t_first = fit(first, make_data(), interrupt=True, max_epochs=max_epochs, **trainer_kwargs)
    assert t_first.current_epoch == 1 and t_first.global_step == t_straight.global_step // max_epochs
    ckpt = tmp_path / "epoch1.ckpt"
    t_first.save_checkpoint(ckpt)

    resumed = make_model()
    if perturb is not None:
        fresh = {k: v.clone() for k, v in resumed.state_dict().items()}
        perturb(resumed)
        assert any(not torch.equal(fresh[k], v) for k, v in resumed.state_dict().items()), "perturb changed nothing"
    t_resumed = fit(resumed, make_data(), ckpt_path=ckpt, max_epochs=max_epochs, **trainer_kwargs)

    assert t_resumed.global_step == t_straight.global_step
    assert_state_dicts_identical(straight.state_dict(), resumed.state_dict())
    opt_a, opt_b = t_straight.optimizers[0].state_dict(), t_resumed.optimizers[0].state_dict()
    assert len(opt_a["state"]) == len(opt_b["state"]) > 0
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        assert state.keys() == opt_b["state"][i].keys()
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][i][name], rtol=0, atol=0, msg=f"optimizer state {i} {name}")
    assert opt_a["param_groups"] == opt_b["param_groups"]  # lr, weight decay, momentum... and the parameter ids
    return ResumeRuns(straight, resumed, first, t_straight, t_resumed, t_first)
