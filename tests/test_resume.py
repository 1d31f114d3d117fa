"""Resuming from an end-of-epoch checkpoint gives exactly the run that never stopped."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from ssl_lightning import SSLDataModule
from ssl_lightning.methods import BYOL, SimCLR

from resume_utils import check_resume_is_exact  # tests/ is on sys.path


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


@pytest.mark.parametrize("cls", [BYOL, SimCLR])
def test_resume_matches_uninterrupted(cls, tmp_path):
    # 2 epochs x 4 steps; parameters, BN buffers, EMA teacher, probe and optimizer state (and lr) bit-identical
    runs = check_resume_is_exact(lambda: _model(cls), _data, tmp_path)
    assert runs.t_straight.global_step == 8 and runs.t_first.global_step == 4
    sd_a = runs.straight.state_dict()
    if cls is BYOL:
        assert any(k.startswith("teacher_backbone.") for k in sd_a)
    # and the interrupted run really diverged from its own starting point
    assert not torch.equal(sd_a["backbone.features.0.weight"], _model(cls).state_dict()["backbone.features.0.weight"])
