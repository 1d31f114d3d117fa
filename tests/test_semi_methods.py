"""Semi-supervised methods (``ssl_lightning.methods.semi_supervised``): the shared base (supervised loss, EMA
evaluation model, val / test accuracy, init_backbone, the CLI's data module, clear errors), each method's
unlabelled loss against a plain transcription of its formula, a Lightning training step of every method, exact
resume of the stateful ones, and the Wide ResNet backbone."""
from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from ssl_lightning.data import SemiSupervisedDataModule, SSLDataModule  # noqa: E402
from ssl_lightning.methods import METHODS, SimCLR  # noqa: E402
from ssl_lightning.methods.semi_supervised import SemiBatch, SemiSupervisedMethod, Supervised  # noqa: E402
from ssl_lightning.registry import SSLError  # noqa: E402

TINY = dict(backbone="convnet", backbone_kwargs={"width": 4}, in_channels=3)


def make_dm(**kwargs) -> SemiSupervisedDataModule:
    defaults = dict(dataset="synthetic", dataset_options={"size": 60, "image_size": 8}, labels_per_class=1,
                    num_val=10, batch_size=4, mu=2, num_workers=0, pin_memory=False, eval_batch_size=32)
    return SemiSupervisedDataModule(**{**defaults, **kwargs})


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(default_root_dir=tmp_path, max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


# ---- the base ------------------------------------------------------------------------------------------------------
def test_supervised_loss_is_the_mean_over_the_labelled_batch():
    model = Supervised(num_classes=5, **TINY)
    logits, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 4, 2, 2, 1, 3])
    batch = SemiBatch(torch.zeros(6, 3, 8, 8), y, torch.arange(6), logits=logits)
    want = sum(-math.log(math.exp(logits[i, y[i]]) / sum(math.exp(v) for v in logits[i].tolist())) for i in range(6)) / 6
    assert float(model.supervised_loss(batch)) == pytest.approx(want, rel=1e-10)


def test_default_forward_is_one_pass_over_labelled_and_unlabelled():
    model = Supervised(num_classes=5, **TINY)
    seen = []
    model.backbone.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    x, views = torch.randn(4, 3, 8, 8), [torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)]
    logits, view_logits = model.forward_batch(SemiBatch(x, torch.zeros(4, dtype=torch.long), torch.arange(4), views))
    assert seen == [20] and logits.shape == (4, 5) and [v.shape for v in view_logits] == [(8, 5), (8, 5)]


def test_fit_logs_val_and_test_accuracy_of_the_ema_model(tmp_path):
    dm = make_dm(mu=0)
    model = Supervised(ema_decay=0.5, nesterov=True, **TINY)  # num_classes read from the data module
    t = trainer(tmp_path, max_steps=4)  # 2 epochs of 2 steps, validated after each
    t.fit(model, datamodule=dm)
    assert model.hparams.num_classes == 10 and model.probe is None
    assert t.optimizers[0].param_groups[0]["nesterov"] is True
    assert not torch.equal(model.classifier.weight, model.ema_classifier.weight)
    for name, ds in (("val", dm.val_set), ("test", dm.test_set)):
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        model.eval()
        with torch.no_grad():
            acc = (model.ema_classifier(model.ema_backbone(x)).argmax(1) == y).float().mean()
        assert float(t.callback_metrics[f"{name}/acc"]) == pytest.approx(float(acc))
    assert set(t.test(model, datamodule=dm, verbose=False)[0]) == {"test/acc"}


def test_ema_model_follows_the_decay_after_every_step(tmp_path):
    model = Supervised(ema_decay=0.9, num_classes=10, **TINY)
    before = {k: v.clone() for k, v in model.classifier.state_dict().items()}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.student = {k: v.clone() for k, v in pl_module.classifier.state_dict().items()}

    snap = Snapshot()
    trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[snap]).fit(model, datamodule=make_dm(mu=0))
    for k, v in model.ema_classifier.state_dict().items():  # callbacks run before the module's EMA update
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * snap.student[k])


def test_ema_warmup():
    model = Supervised(ema_decay=0.999, num_classes=10, **TINY)

    class T:
        global_step = 3

    model._trainer = T()
    assert model.teacher_momentum() == 0.999  # FixMatch's fixed decay
    model.hparams.ema_warmup = True
    assert model.teacher_momentum() == pytest.approx(0.75)  # min(1 - 1 / (3 + 1), 0.999)
    T.global_step = 10 ** 6
    assert model.teacher_momentum() == 0.999


def test_unlabelled_weight_ramps():
    model = Supervised(num_classes=10, lambda_u=3.0, rampup="linear", rampup_length=0.4, **TINY)

    class T:  # a stand-in trainer: the weight reads only its step counts
        global_step, estimated_stepping_batches, num_training_batches, accumulate_grad_batches = 10, 100, 20, 1

    model._trainer = T()
    assert model.unlabelled_weight() == pytest.approx(3.0 * 0.1 / 0.4)
    model.hparams.update(rampup="sigmoid", rampup_length=2, rampup_unit="epochs")
    assert model.unlabelled_weight() == pytest.approx(3.0 * math.exp(-5 * (1 - 0.25) ** 2))
    model.hparams.update(rampup="none")
    assert model.unlabelled_weight() == 3.0


@pytest.mark.parametrize("schedule,step,want", [("fixmatch", 50, math.cos(7 * math.pi * 50 / (16 * 100))),
                                                ("constant", 70, 1.0), ("cosine", 50, 0.5)])
def test_lr_schedules(schedule, step, want):
    model = Supervised(num_classes=10, lr_schedule=schedule, **TINY)
    assert model.lr_factor(step, 0, 100, 10) == pytest.approx(want)


def _ssl_checkpoint(tmp_path, **backbone) -> tuple[Path, torch.nn.Module]:
    ssl = SimCLR(**{**TINY, **backbone}, proj_hidden=8, proj_out=4, num_classes=0)
    torch.nn.init.normal_(ssl.backbone.features[0].weight)
    path = tmp_path / "simclr.ckpt"
    torch.save({"state_dict": ssl.state_dict(), "hyper_parameters": dict(ssl.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path, ssl.backbone


def test_init_backbone_from_a_self_supervised_checkpoint(tmp_path):
    path, pretrained = _ssl_checkpoint(tmp_path)
    model = Supervised(init_backbone=str(path), ema_decay=0.99, lr=0.0, weight_decay=0.0, **TINY)
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=make_dm(mu=0))
    for (name, p), q, e in zip(pretrained.named_parameters(), model.backbone.parameters(), model.ema_backbone.parameters()):
        assert torch.equal(p, q) and torch.equal(p, e), name  # lr 0: the loaded weights, in the EMA copy too


def test_init_backbone_refuses_another_backbone(tmp_path):
    path, _ = _ssl_checkpoint(tmp_path, backbone_kwargs={"width": 8})
    model = Supervised(init_backbone=str(path), num_classes=10, **TINY)
    with pytest.raises(SSLError, match=r"holds backbone 'convnet' with options \{'width': 8\}.*set model.backbone"):
        model.load_init_backbone()


@pytest.mark.parametrize("kwargs,message", [
    ({"lambda_u": -1.0}, r"lambda_u=-1.0: the unlabelled loss weight must be >= 0"),
    ({"ema_decay": 1.0}, r"ema_decay=1.0: use a decay in \[0, 1\)"),
    ({"nesterov": True, "optimizer": "adamw"}, r"nesterov needs optimizer: sgd with momentum > 0"),
    ({"rampup": "cubic"}, r"rampup='cubic'.*use rampup in"),
    ({"lr_schedule": "step"}, r"lr_schedule='step': use cosine, fixmatch, constant or tempens"),
])
def test_clear_errors(kwargs, message):
    with pytest.raises(SSLError, match=message):
        Supervised(num_classes=10, **{**TINY, **kwargs})


def test_refuses_a_self_supervised_data_module(tmp_path):
    dm = SSLDataModule(dataset="synthetic", dataset_options={"size": 16, "image_size": 8}, batch_size=4, num_workers=0)
    with pytest.raises(SSLError, match=r"needs a SemiSupervisedDataModule .* got SSLDataModule"):
        trainer(tmp_path).fit(Supervised(**TINY), datamodule=dm)


def test_cli_builds_the_semi_supervised_data_module_for_these_methods(tmp_path):
    from ssl_lightning.cli import _datamodule_class, main

    assert _datamodule_class(["fit", "--config", "experiments/fashion_mnist/semi/supervised.yaml"]) is SemiSupervisedDataModule
    assert _datamodule_class(["fit", "--config", "experiments/fashion_mnist/simclr.yaml"]) is SSLDataModule
    assert _datamodule_class(["fit", "--model", "supervised"]) is SemiSupervisedDataModule
    assert _datamodule_class({"model": {"class_path": "ssl_lightning.methods.MeanTeacher"}}) is SemiSupervisedDataModule
    assert _datamodule_class({"model": "simclr"}) is SSLDataModule
    run = tmp_path / "run"
    main(["fit", "--model", "supervised", "--model.backbone", "convnet", "--model.backbone_kwargs", '{"width": 4}',
          "--data.dataset", "synthetic", "--data.dataset_options", '{"size": 60, "image_size": 8}',
          "--data.labels_per_class", "1", "--data.num_val", "10", "--data.batch_size", "4", "--data.mu", "2",
          "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--run_dir", str(run)])
    assert (run / "label_split.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_registered():
    assert METHODS.get("supervised") is Supervised and issubclass(Supervised, SemiSupervisedMethod)


# ---- the unlabelled losses against their formulas ---------------------------------------------------------------
from ssl_lightning.methods.semi_supervised import (EntropyMinimisation, MeanTeacher, PiModel, PseudoLabel,  # noqa: E402
                                                   TemporalEnsembling)
from test_semi_pieces import usb  # noqa: E402,F401  (semilearn's criterions, loaded by path)
from resume_utils import check_resume_is_exact  # noqa: E402

C = 5


def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def rand(*shape, seed=0, scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def semi_batch(view_logits: list[torch.Tensor], b: int = 4) -> SemiBatch:
    n = view_logits[0].shape[0]
    return SemiBatch(torch.zeros(b, 3, 8, 8), torch.zeros(b, dtype=torch.long), torch.arange(b),
                     views=[torch.zeros(n, 3, 8, 8)] * len(view_logits), index=torch.arange(n),
                     logits=rand(b, C, seed=99), view_logits=view_logits)


def test_entropy_minimisation_loss():
    logits = rand(12, C)
    want = -sum(sum(p * math.log(p) for p in softmax_row(row)) for row in logits.tolist()) / 12
    loss, _ = EntropyMinimisation(num_classes=C, **TINY).unlabelled_loss(semi_batch([logits]))
    assert float(loss) == pytest.approx(want, rel=1e-10)


def test_pseudo_label_loss_counts_masked_samples_in_the_mean(usb):
    logits = rand(40, C, scale=6.0)
    model = PseudoLabel(num_classes=C, **TINY)
    loss, logs = model.unlabelled_loss(semi_batch([logits]))
    total, kept = 0.0, 0
    for row in logits.tolist():
        p = softmax_row(row)
        if max(p) > 0.95:
            total += -math.log(max(p))  # CE against its own argmax
            kept += 1
    assert 0 < kept < 40 and float(loss) == pytest.approx(total / 40, rel=1e-10)
    assert float(logs["mask_rate"]) == pytest.approx(kept / 40)
    probs = torch.softmax(logits, 1)
    criterions, _ = usb  # USB's pseudo-label: consistency_loss(logits, argmax, "ce", mask = max p >= cutoff)
    torch.testing.assert_close(loss, criterions.consistency_loss(logits, probs.argmax(1), "ce",
                                                                 probs.max(1).values.ge(0.95).double()))
    assert (model.hparams.rampup, model.hparams.rampup_length, model.hparams.rampup_unit) == ("linear", 0.4, "fraction")


@pytest.mark.parametrize("detach", [False, True])
def test_pi_model_loss_and_its_stop_gradient(detach, usb):
    z, z_tilde = rand(12, C, seed=1).requires_grad_(), rand(12, C, seed=2).requires_grad_()
    loss, _ = PiModel(num_classes=C, detach_target=detach, **TINY).unlabelled_loss(semi_batch([z, z_tilde]))
    p, q = [softmax_row(r) for r in z.tolist()], [softmax_row(r) for r in z_tilde.tolist()]
    want = sum((p[b][c] - q[b][c]) ** 2 for b in range(12) for c in range(C)) / (12 * C)
    assert float(loss) == pytest.approx(want, rel=1e-10)
    criterions, _ = usb  # USB's Pi-model: mse of softmax(z) against softmax(z~).detach()
    torch.testing.assert_close(loss, criterions.consistency_loss(z, torch.softmax(z_tilde, 1).detach(), "mse"))
    loss.backward()
    assert z.grad.abs().sum() > 0 and (z_tilde.grad is None or z_tilde.grad.abs().sum() == 0) == detach


def test_pi_model_weight_is_tempens_ramp():
    model = PiModel(num_classes=C, w_max=100.0, rampup_epochs=80, **TINY)

    class DM:
        num_labelled, num_unlabelled, unlabelled = 4000, 45000, "rest"

    class T:
        datamodule, current_epoch = DM(), 0

    model._trainer = T()
    assert model.unlabelled_weight() == 0.0  # the first epoch
    T.current_epoch = 20
    assert model.unlabelled_weight() == pytest.approx(100 * 4000 / 49000 * math.exp(-5 * (1 - 20 / 80) ** 2))
    T.global_step, T.estimated_stepping_batches = 10, 100
    model.hparams.update(tempens_weight=False, lambda_u=10.0, rampup="linear", rampup_length=0.4)
    assert model.unlabelled_weight() == pytest.approx(10.0 * 0.1 / 0.4)  # the FixMatch repository's baseline


def test_temporal_ensembling_targets_and_loss():
    model = TemporalEnsembling(num_classes=C, num_samples=6, **TINY)
    assert model.hparams.w_max == 30.0
    z = [rand(6, C, seed=s) for s in range(3)]
    ensemble = [[0.0] * C for _ in range(6)]
    for epoch, logits in enumerate(z):
        index = torch.tensor([4, 0, 5, 1, 3, 2])
        loss, _ = model.unlabelled_loss(SemiBatch(torch.zeros(1), torch.zeros(1), torch.zeros(1), views=[torch.zeros(1)],
                                                  index=index, view_logits=[logits.float()]))
        correction = 1 - 0.6 ** epoch
        want = 0.0
        for b, i in enumerate(index.tolist()):
            p = softmax_row(logits[b].tolist())
            target = [ensemble[i][c] / correction if epoch else 0.0 for c in range(C)]
            want += sum((p[c] - target[c]) ** 2 for c in range(C))
        assert float(loss) == pytest.approx(want / (6 * C), rel=1e-5)
        for b, i in enumerate(index.tolist()):  # the epoch's end: Z <- 0.6 Z + 0.4 z
            p = softmax_row(logits[b].tolist())
            ensemble[i] = [0.6 * ensemble[i][c] + 0.4 * p[c] for c in range(C)]
        model.on_train_epoch_end()


def test_mean_teacher_loss_momentum_and_teacher_in_train_mode(usb):
    model = MeanTeacher(num_classes=C, alpha=0.99, **TINY).double()
    assert model.hparams.ema_warmup and model.hparams.ema_decay == 0.99
    x, v0, v1 = rand(4, 3, 8, 8, seed=1), rand(8, 3, 8, 8, seed=2), rand(8, 3, 8, 8, seed=3)
    batch = SemiBatch(x, torch.zeros(4, dtype=torch.long), torch.arange(4), views=[v0, v1], index=torch.arange(8))
    batch.logits, batch.view_logits = model.forward_batch(batch)
    assert batch.view_logits[0].shape == (8, C) and len(batch.view_logits) == 1  # the student sees view 0 only
    import copy
    teacher_bb, teacher_fc = copy.deepcopy(model.ema_backbone).train(), copy.deepcopy(model.ema_classifier)
    loss, _ = model.unlabelled_loss(batch)
    with torch.no_grad():
        teacher = torch.softmax(teacher_fc(teacher_bb(torch.cat([x, v1]))), 1)  # batch statistics: train mode
    student = torch.softmax(torch.cat([batch.logits, batch.view_logits[0]]), 1).detach()
    want = sum((student[b, c] - teacher[b, c]).item() ** 2 for b in range(12) for c in range(C)) / (12 * C)
    assert float(loss) == pytest.approx(want, rel=1e-8)
    criterions, _ = usb
    torch.testing.assert_close(loss, criterions.consistency_loss(torch.cat([batch.logits, batch.view_logits[0]]),
                                                                 teacher, "mse"))

    model.hparams.labelled_consistency = False  # the FixMatch repository's baseline: the unlabelled images only
    with torch.no_grad():
        teacher_u = torch.softmax(teacher_fc(teacher_bb(v1)), 1)
    torch.testing.assert_close(model.unlabelled_loss(batch)[0], ((student[4:] - teacher_u) ** 2).mean())

    class T:
        global_step = 1

    model._trainer = T()
    assert model.teacher_momentum() == 0.5  # min(1 - 1 / (step + 1), alpha)
    T.global_step = 1000
    assert model.teacher_momentum() == 0.99
    with pytest.raises(SSLError, match="its decay is alpha"):
        MeanTeacher(num_classes=C, alpha=0.99, ema_decay=0.9, **TINY)
    with pytest.raises(SSLError, match=r"MeanTeacher needs two views .* data.unlabelled_views: \[weak, weak\]"):
        model.forward_batch(SemiBatch(x, batch.y, batch.labelled_index, views=[v0], index=torch.arange(8)))


# ---- every method trains through Lightning ----------------------------------------------------------------------
METHOD_CASES = {
    "supervised": (Supervised, {}, {"mu": 0}),
    "entropy_minimisation": (EntropyMinimisation, {}, {"unlabelled_views": ["weak"]}),
    "pseudo_label": (PseudoLabel, {"threshold": 0.0}, {"unlabelled_views": ["weak"]}),
    "pi_model": (PiModel, {"scale_w_max": False}, {"unlabelled_views": ["weak", "weak"]}),
    "temporal_ensembling": (TemporalEnsembling, {}, {"unlabelled_views": ["weak"]}),
    "mean_teacher": (MeanTeacher, {}, {"unlabelled_views": ["weak", "weak"]}),
}


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_training_steps_through_lightning(name, tmp_path):
    cls, kwargs, data = METHOD_CASES[name]
    assert METHODS.get(name) is cls
    model = cls(**TINY, **kwargs)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    t = trainer(tmp_path, max_steps=6, limit_val_batches=1, log_every_n_steps=1)  # 2 epochs of 3 steps (mu = 2)
    t.fit(model, datamodule=make_dm(dataset_options={"size": 34, "image_size": 8, "num_classes": 4}, num_val=8, **data))
    assert t.global_step == 6 and all(math.isfinite(float(v)) for v in t.callback_metrics.values())
    assert {"train/loss", "train/supervised_loss", "val/acc", "test/acc"} <= set(t.callback_metrics)
    if data.get("mu", 2):
        assert "train/unlabelled_loss" in t.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    if name == "temporal_ensembling":  # 26 unlabelled images, 3 steps of 8: 24 recorded per epoch
        assert int(model.ensemble.epochs_done) == 2 and int((model.ensemble.updates > 0).sum()) >= 24
    if name in ("pi_model", "temporal_ensembling"):
        assert float(t.callback_metrics["train/unlabelled_weight"]) > 0  # second epoch


def _resume_data(views):
    return lambda: make_dm(unlabelled_views=views, dataset_options={"size": 40, "image_size": 8}, num_val=0)


def _seeded(cls, **kwargs):
    def make():
        L.seed_everything(0)
        return cls(**TINY, **kwargs)
    return make


def _perturb_everything(model) -> None:  # the restored state must not come from the fresh model's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for buf in model.buffers():
            buf.copy_(torch.randn_like(buf) if buf.is_floating_point() else torch.randint_like(buf.long(), 0, 2).to(buf))


def test_temporal_ensembling_resumes_exactly(tmp_path):
    # num_samples given: the ensemble exists in the fresh model, and is perturbed there before the resume
    make = _seeded(TemporalEnsembling, rampup_epochs=1, num_classes=10, num_samples=40)
    runs = check_resume_is_exact(make, _resume_data(["weak"]), tmp_path, perturb=_perturb_everything,
                                 default_root_dir=tmp_path)  # the label split is written there
    assert int(runs.resumed.ensemble.epochs_done) == 2 and float(runs.resumed.ensemble.ensemble.abs().sum()) > 0
    assert int(runs.checkpoint["state_dict"]["ensemble.epochs_done"]) == 1



def test_temporal_ensembling_resumes_exactly_from_an_epochs_last_batch(tmp_path):
    # saved in on_train_batch_end of the epoch's last step (5 steps of 8 unlabelled images), before its epoch end
    make = _seeded(TemporalEnsembling, rampup_epochs=1, num_classes=10, num_samples=40)
    runs = check_resume_is_exact(make, _resume_data(["weak"]), tmp_path, perturb=_perturb_everything, stop_at=5,
                                 default_root_dir=tmp_path)
    assert int(runs.checkpoint["state_dict"]["ensemble.epochs_done"]) == 0 and int(runs.resumed.ensemble.epochs_done) == 2


def test_mean_teacher_resumes_exactly(tmp_path):
    runs = check_resume_is_exact(_seeded(MeanTeacher, num_classes=10), _resume_data(["weak", "weak"]), tmp_path,
                                 perturb=_perturb_everything, default_root_dir=tmp_path)
    assert not torch.equal(runs.resumed.ema_classifier.weight, runs.resumed.classifier.weight)


@pytest.mark.parametrize("method,views,stop_at,signum", [
    ("mean_teacher", ["weak", "weak"], 3, None),            # the periodic mid-epoch save
    ("temporal_ensembling", ["weak"], 7, None),             # epoch 1, batch 2: the ensemble's epoch in progress
    ("fixmatch", ["weak", "strong"], 2, signal.SIGTERM)])   # a scheduler's SIGTERM after step 2
def test_semi_methods_resume_mid_epoch_exactly(method, views, stop_at, signum, tmp_path):
    """Both streams (labelled, unlabelled) continue at the next batch with the same samples and views."""
    kwargs = {"rampup_epochs": 1, "num_samples": 40} if method == "temporal_ensembling" else {}
    runs = check_resume_is_exact(_seeded(METHODS.get(method), num_classes=10, **kwargs), _resume_data(views), tmp_path,
                                 perturb=_perturb_everything, stop_at=stop_at, signum=signum, default_root_dir=tmp_path)
    assert runs.checkpoint["SemiSupervisedDataModule"]["train_batches_done"] == stop_at % 5  # 5 steps per epoch


def test_method_errors():
    with pytest.raises(SSLError, match=r"threshold=1.5: use a confidence in \[0, 1\]"):
        PseudoLabel(threshold=1.5, num_classes=C, **TINY)
    with pytest.raises(SSLError, match=r"PiModel needs two views .* data.unlabelled_views: \[weak, weak\]"):
        PiModel(num_classes=C, **TINY).unlabelled_loss(semi_batch([rand(4, C)]))
    with pytest.raises(SSLError, match=r"has not built its ensemble"):
        TemporalEnsembling(num_classes=C, **TINY).unlabelled_loss(semi_batch([rand(4, C)]))


# ---- Wide ResNet ----------------------------------------------------------------------------------------------------
def test_wide_resnet_shapes_and_parameter_counts():
    from ssl_lightning.backbones import build_backbone
    from ssl_lightning.backbones.wide_resnet import WideBlock

    net = build_backbone("wide_resnet28_2")
    count = sum(p.numel() for p in net.parameters()) + (128 * 10 + 10)  # + the 10-way classifier
    assert net.num_features == 128 and count == 1_467_610  # FixMatch's WRN-28-2: 1.47M
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 128) and net.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 128, 8, 8)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.001 and m.eps == 1e-3 for m in bns)
    assert all(m.negative_slope == 0.1 for m in net.modules() if isinstance(m, torch.nn.LeakyReLU))
    assert sum(isinstance(m, WideBlock) for m in net.modules()) == 12
    assert build_backbone("wide_resnet28_8").num_features == 512
    assert build_backbone("wide_resnet", depth=10, widen=1, in_channels=1)(torch.randn(1, 1, 16, 16)).shape == (1, 64)
    with pytest.raises(SSLError, match=r"depth=27: use depth = 6 n \+ 4"):
        build_backbone("wide_resnet", depth=27)


def test_wide_resnet_feature_maps():
    from ssl_lightning.backbones import build_backbone
    from ssl_lightning.backbones.feature_maps import Stage, feature_maps, pool, stages

    net = build_backbone("wide_resnet", depth=10, widen=2).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = feature_maps(net, x)
    assert [(k, tuple(v.shape[1:])) for k, v in maps.items()] == [("stem", (16, 16, 16)), ("group1", (32, 16, 16)),
                                                                  ("group2", (64, 8, 8)), ("group3", (128, 4, 4))]
    torch.testing.assert_close(pool(maps["group3"]), net(x))
    assert stages(net) == [Stage("stem", 16, 1), Stage("group1", 32, 1), Stage("group2", 64, 2), Stage("group3", 128, 4)]
