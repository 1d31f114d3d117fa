"""DINO: the multi-crop cross-entropy against a plain double loop and lightly, the centre (global
all-reduced mean, 2-process DDP equivalence), the teacher-temperature and weight-decay schedules, the
frozen last layer, and exact resume (teacher and centre)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from ssl_lightning import SSLDataModule
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.losses.joint_embedding.dino import DINOLoss, dino_cross_entropy, teacher_temperature
from ssl_lightning.methods.joint_embedding.dino import DINO

from ddp_utils import grads, LossStep, spawn_results, WORLD  # tests/ is on sys.path
from resume_utils import check_resume_is_exact

K = 32  # out_dim in the small tests


# ---- plain transcription of the paper's loss -----------------------------------------------------------
def plain_dino(teacher: list[np.ndarray], student: list[np.ndarray], center: np.ndarray, t_t: float, t_s: float) -> float:
    """Mean over pairs (t global, s != t) of mean_b -sum_k P_t log P_s, in float64 with explicit loops."""
    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    pair_losses = []
    for t in range(len(teacher)):
        for s in range(len(student)):
            if s == t:
                continue
            per_sample = [-(softmax((teacher[t][b] - center) / t_t) * np.log(softmax(student[s][b] / t_s))).sum()
                          for b in range(len(student[s]))]
            pair_losses.append(np.mean(per_sample))
    return float(np.mean(pair_losses))


def random_outputs(n_student=4, n_teacher=2, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, K, generator=g) for _ in range(n_student)],
            [torch.randn(B, K, generator=g) for _ in range(n_teacher)],
            0.3 * torch.randn(1, K, generator=g))


def test_loss_matches_plain_double_loop_and_centre_update():
    student, teacher, center = random_outputs()
    loss_fn = DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(center)
    got = loss_fn(student, teacher, teacher_temp=0.05)
    want = plain_dino([t.double().numpy() for t in teacher], [s.double().numpy() for s in student],
                      center.double().numpy()[0], 0.05, 0.1)
    assert abs(float(got) - want) < 1e-5
    # c <- m c + (1 - m) mean over the teacher's global crops of the batch
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True))
    # the plain function: the same cross-entropy from given teacher probabilities
    probs = [torch.softmax((t - center) / 0.05, dim=-1) for t in teacher]
    assert abs(float(dino_cross_entropy(probs, student, 0.1)) - want) < 1e-5


def test_teacher_is_detached_and_student_gets_gradient():
    student, teacher, _ = random_outputs()
    student = [s.requires_grad_() for s in student]
    teacher = [t.requires_grad_() for t in teacher]
    DINOLoss(K)(student, teacher, 0.04).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_matches_lightly():
    """lightly.loss.DINOLoss computes the same loss and centre update. Differences (documented here): its
    centre has shape (1, 1, D); it updates the centre inside forward like ours; its built-in schedule is
    selected with ``epoch=`` and uses the same linspace, but its DEFAULT teacher_temp is 0.04 (the official
    code's argparse default) while ours is the paper's 0.07 after the 30-epoch warm-up from 0.04."""
    from lightly.loss import DINOLoss as LightlyDINOLoss

    student, teacher, center = random_outputs(n_student=6)
    ours = DINOLoss(K)
    ours.center.copy_(center)
    theirs = LightlyDINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07,
                             warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9)
    theirs.center.copy_(center.view(1, 1, K))
    for epoch in (0, 7, 29, 30, 100):
        temp = teacher_temperature(epoch, 0.07, 0.04, 30)
        torch.testing.assert_close(ours(student, teacher, temp), theirs(teacher, student, epoch=epoch), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.center, theirs.center.view(1, K), atol=1e-7, rtol=0)


def test_teacher_temperature_schedule():
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))  # main_dino.py DINOLoss
    ours = [teacher_temperature(e, 0.07, 0.04, 30) for e in range(100)]
    np.testing.assert_allclose(ours, official, atol=1e-7)
    assert ours[0] == pytest.approx(0.04) and ours[29] == pytest.approx(0.07) and ours[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert teacher_temperature(0, 0.04, 0.04, 0) == 0.04  # no warm-up: constant


# ---- models and data ------------------------------------------------------------------------------------
def build_dino(norm: str = "none", **kw) -> DINO:
    torch.manual_seed(0)
    kwargs = dict(backbone="convnet", backbone_kwargs={"norm": norm, "width": 8}, in_channels=1, num_classes=0,
                  out_dim=K, hidden_dim=32, bottleneck_dim=16)
    return DINO(**(kwargs | kw))


B, IMAGE = 4, 16  # per process


def global_views(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(WORLD * B, 1, IMAGE, IMAGE, generator=g) for _ in range(2)] + \
           [torch.randn(WORLD * B, 1, IMAGE // 2, IMAGE // 2, generator=g) for _ in range(3)]


def scenario_dino(rank: int, world: int, out: Path) -> dict:
    model = build_dino()
    model.load_state_dict(torch.load(out / "dino_init.pt", weights_only=True))
    model.dino_loss.center.normal_(generator=torch.Generator().manual_seed(5))  # a non-zero centre, same on all ranks
    views = [v[rank * B:(rank + 1) * B] for v in global_views()]
    ddp = nn.parallel.DistributedDataParallel(LossStep(model))
    loss = ddp(views)
    loss.backward()
    center_1 = model.dino_loss.center.clone()
    with torch.no_grad():
        loss_2 = model.loss(model.forward_views(views), views, None)["loss"]  # uses the updated centre
    return {"loss": loss.detach(), "grads": grads(model), "center": center_1, "loss_2": loss_2,
            "center_2": model.dino_loss.center.clone()}


SCENARIOS = {"dino": scenario_dino}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp_dino", SCENARIOS, {"dino_init.pt": build_dino})


def test_ddp_matches_single_process_on_global_batch(ddp):
    results = ddp("dino")
    model = build_dino()
    model.load_state_dict(torch.load(ddp.out / "dino_init.pt", weights_only=True))
    model.dino_loss.center.normal_(generator=torch.Generator().manual_seed(5))
    views = global_views()
    loss = model.loss(model.forward_views(views), views, None)["loss"]
    loss.backward()
    ref_grads, ref_center = grads(model), model.dino_loss.center.clone()
    with torch.no_grad():
        ref_loss_2 = model.loss(model.forward_views(views), views, None)["loss"]

    losses = torch.stack([r["loss"] for r in results])
    assert not torch.allclose(losses[0], losses[1]), "both ranks computed the same loss: were batches split?"
    torch.testing.assert_close(losses.mean(), loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([r["loss_2"] for r in results]).mean(), ref_loss_2, atol=1e-5, rtol=0)
    assert not any("teacher" in n for n in ref_grads)
    assert max(g.abs().max() for g in ref_grads.values()) > 1e-4  # 100 x the gradient tolerance: a real constraint
    for r, res in enumerate(results):
        # the centre is the all-reduced global-batch mean: identical on every rank and to one process
        torch.testing.assert_close(res["center"], ref_center, atol=1e-6, rtol=0)
        torch.testing.assert_close(res["center_2"], model.dino_loss.center, atol=1e-6, rtol=0)
        assert res["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(res["grads"][name], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"rank {r} {n}: {m}")


# ---- through Lightning: schedules, frozen last layer, exact resume ------------------------------------------
def _data() -> SSLDataModule:
    views = [ViewConfig(size=16, count=2, scale=(0.3, 1.0)), ViewConfig(size=8, count=2, scale=(0.1, 0.3))]
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16, views=views,
                         dataset_options={"size": 32, "image_size": 16, "channels": 1})


def _model() -> DINO:
    L.seed_everything(0)
    return DINO(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10, out_dim=K,
                hidden_dim=32, bottleneck_dim=16, warmup_teacher_temp_epochs=2, momentum_base=0.9,
                freeze_last_layer=1, lr=5e-3, warmup_epochs=1)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        last = pl_module.head.last_layer_v.grad
        wds = [g["weight_decay"] for g in optimizer.param_groups]
        self.rows.append((trainer.current_epoch, trainer.global_step, last is not None and bool(last.abs().sum() > 0), wds))


def _perturb(model: DINO) -> None:  # restored state must not depend on init
    torch.nn.init.normal_(model.teacher_head.last_layer_v)
    model.dino_loss.center.fill_(1.0)


def test_frozen_last_layer_weight_decay_schedule_and_exact_resume(tmp_path):
    rec = Recorder()
    v0 = _model().head.last_layer_v.detach().clone()  # seeded: the initial last layer of every run below
    # 2 epochs x 4 steps straight; 1 epoch, checkpoint, resume; student, teacher, centre, probe, optimizer identical
    runs = check_resume_is_exact(_model, _data, tmp_path, perturb=_perturb, straight_callbacks=[rec],
                                 gradient_clip_val=3.0)
    straight = runs.straight

    # last layer: no gradient in epoch 0, a gradient afterwards
    assert [r[2] for r in rec.rows] == [False] * 4 + [True] * 4
    # weight decay: cosine 0.04 -> 0.4 over the 8 steps on the decayed group; 0 on biases / norms / probe
    for _, step, _, wds in rec.rows:
        want = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * step / 8))
        assert wds[0] == pytest.approx(want) and all(w == 0 for w in wds[1:])
    assert rec.rows[0][3][0] == pytest.approx(0.04)
    # the teacher moved (EMA), the centre moved, the last layer trained only in epoch 1
    assert not torch.equal(straight.head.last_layer_v, v0)
    assert straight.dino_loss.center.abs().sum() > 0

    assert torch.equal(runs.first.head.last_layer_v, v0), "the last layer must not change in the frozen first epoch"
    sd_a = straight.state_dict()
    assert "dino_loss.center" in sd_a and any(k.startswith("teacher_head.") for k in sd_a)
