"""SSLMethod's shared machinery: optimizer groups, learning-rate scaling and schedule, EMA step."""
from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch

from ssl_lightning import SSLDataModule
from ssl_lightning.losses import nt_xent
from ssl_lightning.methods import BYOL, SimCLR
from ssl_lightning.modules import cosine_momentum


def _data(batch_size: int = 8) -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=batch_size, num_workers=0, pin_memory=False, image_size=16,
                         dataset_options={"size": 32, "image_size": 16, "channels": 1})


def _fit(model, max_epochs: int = 2) -> L.Trainer:
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, _data())
    return trainer


class FixedPredictor(SimCLR):
    """A subclass that gives its projector a fixed (unscheduled) learning rate."""

    def extra_param_groups(self):
        return [{"params": list(self.projector.parameters()), "fixed_lr": True, "lr": 0.01}]


def test_param_groups_lr_scaling_and_schedule():
    L.seed_everything(0)
    model = FixedPredictor(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10,
                           proj_hidden=16, proj_out=8, optimizer="sgd", lr=0.8, weight_decay=1e-3,
                           warmup_epochs=1, probe_lr=0.2)
    trainer = _fit(model)  # 2 epochs x 4 steps, warm-up 4 steps
    groups = trainer.optimizers[0].param_groups
    decay, no_decay, fixed, probe = groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(p) for n, p in model.backbone.named_parameters() if p.ndim > 1}
    assert ids(no_decay["params"]) == {id(p) for n, p in model.backbone.named_parameters() if p.ndim <= 1}
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert ids(fixed["params"]) == ids(model.projector.parameters()) and fixed["lr"] == 0.01
    assert ids(probe["params"]) == ids(model.probe.parameters()) and probe["weight_decay"] == 0.0
    # lr 0.8 per 256 images x global batch 8: after all 8 steps the cosine has reached 0 (min_lr_ratio 0)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs[:2] == [0.8 * 8 / 256] * 2 and scheduler.base_lrs[3] == 0.2
    assert decay["lr"] == pytest.approx(0.0) and probe["lr"] == pytest.approx(0.0)
    assert fixed["lr"] == 0.01  # never scheduled
    factors = [scheduler.lr_lambdas[0](s) for s in range(8)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up over the first epoch
    assert factors[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def test_simclr_projector_is_the_official_head():
    """google-research/simclr model_util.projection_head: Linear -> BN -> ReLU, then Linear without bias -> BN
    with a scale but no shift (center=False)."""
    proj = SimCLR(backbone="convnet", in_channels=1, num_classes=0, proj_hidden=32, proj_out=8).projector
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert proj[0].bias is None and proj[3].bias is None
    assert proj[4].weight.requires_grad and not proj[4].bias.requires_grad and not proj[4].bias.any()


def test_simclr_projector_normalises_over_both_views():
    """The official model.py concatenates the two views before the encoder and the projection head, so each
    BatchNorm of the head takes its statistics over all 2B projections, not over each view's B."""
    torch.manual_seed(0)
    model = SimCLR(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0, proj_hidden=16,
                   proj_out=8).train()
    seen = []
    for m in model.projector:
        if isinstance(m, torch.nn.BatchNorm1d):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    feats = [torch.randn(6, model.backbone.num_features), torch.randn(6, model.backbone.num_features) + 1.0]
    loss = model.loss(feats, [], torch.arange(6))
    assert seen == [12, 12]
    per_view = nt_xent(*(model.projector(f) for f in feats), 0.5)  # what separate passes would give
    assert not torch.allclose(loss, per_view)


# ---- the framework's training = a plain PyTorch loop of lightly's pieces (the peer benchmark's loop) ------
BATCH, STEPS, EPOCHS = 16, 3, 2  # the fixed batches: STEPS of BATCH images per epoch


def _plain_loop_recipe(params, lr: float, weight_decay: float):
    """SGD and the configs' schedule written plainly: weight decay on weights only, lr x batch / 256, warm-up
    for one epoch then cosine, stepped per batch."""
    groups = [{"params": [p for p in params if p.requires_grad and p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.requires_grad and p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=lr * BATCH / 256, momentum=0.9)
    total = STEPS * EPOCHS
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / STEPS if s < STEPS else
                                                 0.5 * (1 + math.cos(math.pi * (s - STEPS) / (total - STEPS))))
    return optimizer, schedule


def _batches_and_backbone_copy(model):
    """Fixed random batches ``views[step] = (view 1, view 2)``, the backbone's start and its copy for the loop."""
    views = torch.randn(STEPS, 2, BATCH, 1, 16, 16)
    start = [p.detach().clone() for p in model.backbone.parameters()]
    return views, start, copy.deepcopy(model.backbone).train()


def _fit_on_batches(model, views: torch.Tensor) -> None:
    """Trains ``model`` through Lightning on the fixed batches ``views[step] = (view 1, view 2)``, in order."""
    data = [([x0[i], x1[i]], 0, i) for x0, x1 in views for i in range(BATCH)]
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=BATCH))


def _assert_same_parameters(pairs, start) -> None:
    for ours, loop in pairs:
        for (name, p), q in zip(ours.named_parameters(), loop.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    moved = [not torch.equal(p, p0) for p, p0 in zip(pairs[0][0].parameters(), start)]
    assert all(moved)


def test_simclr_training_equals_a_plain_loop_of_lightly_pieces():
    """Through Lightning (parameter groups, per-step warm-up + cosine, one backbone and one projector pass over
    both views) SimCLR's steps equal a plain loop of lightly's SimCLRProjectionHead and NTXentLoss, given the
    same start and batches, and the official recipe: weight decay on weights only, no shift in the head's last
    BatchNorm (the two places where the peer benchmark's lightly loop differs)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(0)
    model = SimCLR(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0, proj_hidden=32,
                   proj_out=16, temperature=0.5, optimizer="sgd", lr=1.2, weight_decay=5e-4, momentum=0.9,
                   warmup_epochs=1)
    views, start, backbone = _batches_and_backbone_copy(model)
    head = SimCLRProjectionHead(model.backbone.num_features, 32, 16).train()
    head.layers.load_state_dict(model.projector.state_dict())  # the same layout: Linear, BN, ReLU, Linear, BN
    head.layers[-1].bias.requires_grad_(False)
    optimizer, schedule = _plain_loop_recipe([*backbone.parameters(), *head.parameters()], 1.2, 5e-4)
    criterion = NTXentLoss(temperature=0.5)
    for step in range(STEPS * EPOCHS):
        x0, x1 = views[step % STEPS]
        z0, z1 = head(backbone(torch.cat([x0, x1]))).chunk(2)
        optimizer.zero_grad()
        criterion(z0, z1).backward()
        optimizer.step()
        schedule.step()

    _fit_on_batches(model, views)
    _assert_same_parameters([(model.backbone, backbone), (model.projector, head.layers)], start)


def test_byol_training_equals_a_plain_loop_of_lightly_pieces():
    """BYOL through Lightning (each view through the networks separately, EMA of backbone and projector after
    every optimizer step with the cosine momentum) equals a plain loop of lightly's BYOL heads,
    NegativeCosineSimilarity, update_momentum and cosine_schedule, given the same start, batches and recipe
    (weight decay on weights only). Our loss, 2 - 2 cos per direction, is 2 x lightly's -cos + 4. SGD here: Adam
    would turn the rounding noise of gradients that BatchNorm makes ~0 (the projector's last bias, followed by the
    predictor's BN) into full-size steps that differ between any two implementations."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(0)
    model = BYOL(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0, proj_hidden=32,
                 proj_out=16, pred_hidden=32, momentum_base=0.9, optimizer="sgd", lr=0.5, weight_decay=1e-4,
                 warmup_epochs=1)
    views, start, backbone = _batches_and_backbone_copy(model)
    proj = BYOLProjectionHead(model.backbone.num_features, 32, 16).train()
    pred = BYOLPredictionHead(16, 32, 16).train()
    proj.layers.load_state_dict(model.projector.state_dict())  # the same layouts: Linear, BN, ReLU, Linear
    pred.layers.load_state_dict(model.predictor.state_dict())
    teacher_backbone, teacher_proj = copy.deepcopy(backbone), copy.deepcopy(proj)
    optimizer, schedule = _plain_loop_recipe([*backbone.parameters(), *proj.parameters(), *pred.parameters()],
                                             0.5, 1e-4)
    criterion, total = NegativeCosineSimilarity(), STEPS * EPOCHS
    for step in range(total):
        x0, x1 = views[step % STEPS]
        p0, p1 = (pred(proj(backbone(x))) for x in (x0, x1))
        with torch.no_grad():
            t0, t1 = (teacher_proj(teacher_backbone(x)) for x in (x0, x1))
        optimizer.zero_grad()
        (2 * (criterion(p0, t1) + criterion(p1, t0))).backward()
        optimizer.step()
        schedule.step()
        m = cosine_schedule(step, total + 1, 0.9, 1.0)  # max_steps - 1 = total: BYOL's cos(pi k / K)
        update_momentum(backbone, teacher_backbone, m)
        update_momentum(proj, teacher_proj, m)

    _fit_on_batches(model, views)
    _assert_same_parameters([(model.backbone, backbone), (model.projector, proj.layers), (model.predictor, pred.layers),
                             (model.teacher_backbone, teacher_backbone), (model.teacher_projector, teacher_proj.layers)],
                            start)


def test_byol_teacher_follows_cosine_momentum():
    L.seed_everything(0)
    model = BYOL(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0, proj_hidden=16,
                 proj_out=8, pred_hidden=16, momentum_base=0.9, optimizer="sgd", lr=0.5)
    teacher = [p.detach().clone() for p in model.teacher_backbone.parameters()]
    student = []

    class Record(L.Callback):  # the student right after each optimizer step, before the EMA update
        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            student.append([p.detach().clone() for p in pl_module.backbone.parameters()])

    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Record()])
    trainer.fit(model, _data())
    total = int(trainer.estimated_stepping_batches)
    # on_before_zero_grad fires before each step's backward: entries 1.. are the students after steps 1..
    student.append([p.detach().clone() for p in model.backbone.parameters()])
    for step in range(3):
        m = cosine_momentum(step, total, 0.9, 1.0)
        teacher = [m * t + (1 - m) * s for t, s in zip(teacher, student[step + 1])]
    for t, p in zip(teacher, model.teacher_backbone.parameters()):
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for p in model.teacher_backbone.parameters())


def test_module_paths_from_before_the_families_still_import():
    """Checkpoints (``_class_path``) and run configs written before methods were grouped by family name
    ``ssl_lightning.methods.<module>.<Class>``; code imported ``ssl_lightning.losses.<module>``."""
    import importlib

    from ssl_lightning.losses import sinkhorn
    from ssl_lightning.methods import METHODS, MoCoV2

    assert importlib.import_module("ssl_lightning.methods.moco").MoCoV2 is MoCoV2
    assert importlib.import_module("ssl_lightning.losses.swav").sinkhorn is sinkhorn
    for name in METHODS.names():  # every registered method lives in a family sub-package
        assert METHODS.get(name).__module__.count(".") == 3, name
