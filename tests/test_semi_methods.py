"""Semi-supervised methods (``ssl_lightning.methods.semi_supervised``): the shared base (supervised loss, EMA
evaluation model, val / test accuracy, init_backbone, the CLI's data module, clear errors), each method's
unlabelled loss against a plain transcription of its formula, a Lightning training step of every method, exact
resume of the stateful ones, and the Wide ResNet backbone."""
from __future__ import annotations

import math
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
    m = min(0.9, (1 + 0) / (10 + 0))  # the warmed-up decay of the update after step 0: 0.1
    for k, v in model.ema_classifier.state_dict().items():  # callbacks run before the module's EMA update
        torch.testing.assert_close(v, m * before[k] + (1 - m) * snap.student[k])


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
    run = tmp_path / "run"
    main(["fit", "--model", "supervised", "--model.backbone", "convnet", "--model.backbone_kwargs", '{"width": 4}',
          "--data.dataset", "synthetic", "--data.dataset_options", '{"size": 60, "image_size": 8}',
          "--data.labels_per_class", "1", "--data.num_val", "10", "--data.batch_size", "4", "--data.mu", "2",
          "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--run_dir", str(run)])
    assert (run / "label_split.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_registered():
    assert METHODS.get("supervised") is Supervised and issubclass(Supervised, SemiSupervisedMethod)
