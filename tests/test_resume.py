"""Resuming from an end-of-epoch checkpoint gives exactly the run that never stopped."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from ssl_lightning import SSLDataModule
from ssl_lightning.methods import BYOL, SimCLR


def _data() -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         dataset_options={"size": 32, "image_size": 16, "channels": 1})


def _model(cls):
    L.seed_everything(0)
    kwargs = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10,
                  optimizer="lars", lr=0.5, warmup_epochs=1)
    if cls is BYOL:
        kwargs.update(proj_hidden=32, proj_out=16, pred_hidden=32, momentum_base=0.9)
    else:
        kwargs.update(proj_hidden=32, proj_out=16)
    return cls(**kwargs)


class StopAfterFirstEpoch(L.Callback):
    """Interrupts a run configured for 2 epochs (schedules keep their 2-epoch length)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _fit(model, max_epochs: int = 2, ckpt_path=None, interrupt: bool = False) -> L.Trainer:
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        deterministic=True, callbacks=[StopAfterFirstEpoch()] if interrupt else [])
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("cls", [BYOL, SimCLR])
def test_resume_matches_uninterrupted(cls, tmp_path):
    straight = _model(cls)
    t_straight = _fit(straight)  # 2 epochs x 4 steps

    first = _model(cls)
    t_first = _fit(first, interrupt=True)
    assert t_first.global_step == 4
    ckpt = tmp_path / "epoch1.ckpt"
    t_first.save_checkpoint(ckpt)
    resumed = _model(cls)
    torch.nn.init.normal_(next(resumed.parameters()))  # restored state must not depend on init
    t_resumed = _fit(resumed, ckpt_path=str(ckpt))

    assert t_resumed.global_step == t_straight.global_step == 8
    sd_a, sd_b = straight.state_dict(), resumed.state_dict()
    assert sd_a.keys() == sd_b.keys()
    if cls is BYOL:
        assert any(k.startswith("teacher_backbone.") for k in sd_a)
    for key in sd_a:  # parameters, BN buffers, EMA teacher, probe
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=0, atol=0, msg=key)
    opt_a, opt_b = t_straight.optimizers[0].state_dict(), t_resumed.optimizers[0].state_dict()
    assert len(opt_a["state"]) == len(opt_b["state"]) > 0
    for i, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][i][name], rtol=0, atol=0)
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    # and the interrupted run really diverged from its own starting point
    assert not torch.equal(sd_a["backbone.features.0.weight"], _model(cls).state_dict()["backbone.features.0.weight"])
