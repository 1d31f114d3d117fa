"""SimSiam: loss against the paper's formula and lightly, stop-gradient placement, collapse monitor,
heads, and the predictor's fixed learning rate. SimSiam gathers nothing across processes (its loss is
per-sample), so it needs no DDP test."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning import SSLDataModule
from ssl_lightning.losses.joint_embedding.simsiam import negative_cosine, normalized_std, simsiam_loss
from ssl_lightning.methods.joint_embedding.simsiam import SimSiam


def simsiam_reference(p1, p2, z1, z2):
    """Algorithm 1 of the paper: D(p, z) = -(p/||p||) . (z/||z||) with z detached, L = D(p1, z2)/2 + D(p2, z1)/2."""
    def d(p, z):
        z = z.detach()
        return -((p / p.norm(dim=1, keepdim=True)) * (z / z.norm(dim=1, keepdim=True))).sum(dim=1).mean()
    return d(p1, z2) / 2 + d(p2, z1) / 2


def _inputs(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g).requires_grad_() for _ in range(4)]


def test_simsiam_loss_matches_plain_formula_and_lightly():
    from lightly.loss import NegativeCosineSimilarity

    p1, p2, z1, z2 = _inputs()
    got = simsiam_loss(p1, p2, z1, z2)
    torch.testing.assert_close(got, simsiam_reference(p1, p2, z1, z2), atol=1e-6, rtol=1e-6)
    lightly_loss = NegativeCosineSimilarity()  # lightly leaves the stop-gradient to the caller
    torch.testing.assert_close(got, 0.5 * (lightly_loss(p1, z2.detach()) + lightly_loss(p2, z1.detach())), atol=1e-6, rtol=1e-6)
    g_got = torch.autograd.grad(got, (p1, p2))
    g_want = torch.autograd.grad(simsiam_reference(p1, p2, z1, z2), (p1, p2))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_stop_gradient_on_z_not_p():
    p1, p2, z1, z2 = _inputs()
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # sg(z): no gradient through the projections' targets
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    z = torch.randn(4, 3)
    assert negative_cosine(z, z) == pytest.approx(-1.0) and negative_cosine(z, -z) == pytest.approx(1.0)


def test_collapse_monitor():
    torch.manual_seed(0)
    healthy = torch.randn(4096, 64)
    assert normalized_std(healthy) == pytest.approx(1.0, abs=0.02)  # std of a unit vector's entry ~ 1/sqrt(d)
    collapsed = torch.randn(1, 64).repeat(128, 1) + 1e-6 * torch.randn(128, 64)
    assert normalized_std(collapsed) < 1e-4


def test_heads_follow_the_paper():
    model = SimSiam(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]  # fc-BN-ReLU x2, fc-BN
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 2048]
    assert not model.projector[-1].affine and model.projector[-2].bias is None
    assert [type(m).__name__ for m in model.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_features for m in model.predictor if isinstance(m, torch.nn.Linear)] == [512, 2048]
    assert model.predictor[-1].bias is not None


def _model(**kwargs):
    L.seed_everything(0)
    return SimSiam(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10,
                   proj_hidden=32, proj_out=32, pred_hidden=8, optimizer="sgd", lr=0.05, warmup_epochs=1, **kwargs)


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append({g.get("name", str(i)): g["lr"] for i, g in enumerate(trainer.optimizers[0].param_groups)})


def test_predictor_lr_is_fixed_and_training_logs_z_std():
    model, record = _model(), RecordLR()
    data = SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         dataset_options={"size": 32, "image_size": 16, "channels": 1})
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[record])
    trainer.fit(model, data)
    groups = trainer.optimizers[0].param_groups
    pred = [g for g in groups if g.get("name") == "predictor"]
    assert pred and {id(p) for g in pred for p in g["params"]} == {id(p) for p in model.predictor.parameters()}
    assert all(g["fixed_lr"] for g in pred)
    base = 0.05 * 8 / 256
    assert all(lrs["predictor"] == pytest.approx(base) for lrs in record.lrs)  # constant, no warm-up or decay
    others = [lrs["0"] for lrs in record.lrs]  # the encoder's weights: warm-up then cosine
    assert len(set(others)) > 2 and max(others) == pytest.approx(base)
    assert torch.isfinite(trainer.callback_metrics["train/z_std"])

    assert _model(fix_pred_lr=False).extra_param_groups() == []
