"""TWIST: every loss term against a plain float64 transcription of the paper / official code (multi-crop
pairs, momentum-teacher form, self-labelling with its threshold and quantile schedule), the NBS head,
class probabilities, 2-process DDP (same loss and gradients as one process on the global batch), a
Lightning run through both stages (terms, lr schedule), and exact resume with the momentum teacher."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from ssl_lightning import SSLDataModule
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.losses.joint_embedding.twist import (diversity, multicrop_pairs, multicrop_twist_loss, self_label_loss,
                                        self_label_quantile, teacher_twist_loss, twist_loss)
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.joint_embedding.twist import TWIST
from ssl_lightning.optim import warmup_cosine
from ssl_lightning.registry import SSLError

from ddp_utils import grads, spawn_results, WORLD  # tests/ is on sys.path
from resume_utils import check_resume_is_exact, fit

EPS = 1e-5


# ---- plain transcriptions (float64, explicit loops) ------------------------------------------------------
def plain_kl(p: np.ndarray, q: np.ndarray) -> float:
    total = 0.0
    for b in range(p.shape[0]):
        total += sum(p[b, k] * (np.log(p[b, k] + EPS) - np.log(q[b, k] + EPS)) for k in range(p.shape[1]))
    return total / p.shape[0]


def plain_sharpness(p: np.ndarray) -> float:
    return float(np.mean([-sum(p[b, k] * np.log(p[b, k] + EPS) for k in range(p.shape[1])) for b in range(p.shape[0])]))


def plain_diversity(p: np.ndarray) -> float:
    m = [sum(p[b, k] for b in range(p.shape[0])) / p.shape[0] for k in range(p.shape[1])]
    return -sum(mk * np.log(mk + EPS) for mk in m)


def plain_pair(p1, p2, l1, l2):
    kl = 0.5 * (plain_kl(p1, p2) + plain_kl(p2, p1))
    eh = 0.5 * (plain_sharpness(p1) + plain_sharpness(p2))
    he = 0.5 * (plain_diversity(p1) + plain_diversity(p2))
    return kl + (1 + l1) * eh - l2 * he, (kl, eh, he)


def random_probs(n_views=2, B=6, C=5, seed=0, scale=2.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = [scale * torch.randn(B, C, generator=g, dtype=torch.float64) for _ in range(n_views)]
    return [z.requires_grad_(requires_grad) for z in logits]


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("l1,l2", [(0.0, 1.0), (-0.6, 1.0), (0.5, 2.0)])
def test_two_view_loss_matches_plain_transcription(l1, l2):
    p1, p2 = (z.softmax(1) for z in random_probs())
    out = twist_loss(p1, p2, l1, l2, EPS)
    want, (kl, eh, he) = plain_pair(np_(p1), np_(p2), l1, l2)
    assert float(out["loss"].detach()) == pytest.approx(want, abs=1e-10)
    for name, ref in (("consistency", kl), ("sharpness", eh), ("diversity", he)):
        assert float(out[name]) == pytest.approx(ref, abs=1e-10)
    assert kl > 0.1 and eh > 0.1 and he > 0.1  # every term active
    # limits: identical views -> no consistency; one-hot -> ~0 sharpness; uniform mean -> diversity log C
    same = twist_loss(p1, p1)
    assert float(same["consistency"]) == pytest.approx(0.0, abs=1e-12)
    onehot = torch.eye(5, dtype=torch.float64)
    assert float(twist_loss(onehot, onehot)["sharpness"]) == pytest.approx(0.0, abs=1e-4)
    assert float(diversity(onehot)) == pytest.approx(np.log(5), abs=1e-4)


def test_multicrop_pairs_and_loss_match_plain_loops():
    assert multicrop_pairs(2) == [(0, 1)]
    assert multicrop_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # no local-local pair
    probs = [z.softmax(1) for z in random_probs(n_views=5, seed=1)]
    out = multicrop_twist_loss(probs, lambda1=0.2, lambda2=1.5)
    P = [np_(p) for p in probs]
    pair_values, pair_terms = [], []
    for i in range(2):  # official engine.py: first view global, second any later view
        for j in range(i + 1, 5):
            value, terms = plain_pair(P[i], P[j], 0.2, 1.5)
            pair_values.append(value)
            pair_terms.append(terms)
    assert len(pair_values) == 7
    assert float(out["loss"]) == pytest.approx(np.mean(pair_values), abs=1e-10)
    for idx, name in enumerate(("consistency", "sharpness", "diversity")):
        assert float(out[name]) == pytest.approx(np.mean([t[idx] for t in pair_terms]), abs=1e-10)


def test_teacher_form_matches_plain_loops():
    student_logits = random_probs(n_views=4, seed=2, requires_grad=True)
    teacher_logits = random_probs(n_views=2, seed=3, requires_grad=True)
    student, teacher = [z.softmax(1) for z in student_logits], [z.softmax(1) for z in teacher_logits]
    out = teacher_twist_loss(teacher, student, lambda1=-0.6, lambda2=1.0)
    S, T = [np_(p) for p in student], [np_(p) for p in teacher]
    kl = np.mean([plain_kl(T[t], S[s]) for t in range(2) for s in range(4) if s != t])
    eh = np.mean([plain_sharpness(s) for s in S])
    he = np.mean([plain_diversity(s) for s in S])
    assert float(out["loss"].detach()) == pytest.approx(kl + 0.4 * eh - he, abs=1e-10)
    out["loss"].backward()
    assert all(z.grad is None for z in teacher_logits)  # the teacher's probabilities are targets
    assert all(z.grad.abs().sum() > 0 for z in student_logits)


def test_errors_are_named():
    with pytest.raises(SSLError, match="same shape"):
        twist_loss(torch.rand(4, 3), torch.rand(4, 5))
    with pytest.raises(SSLError, match="at least 2 views"):
        multicrop_twist_loss([torch.rand(4, 3)])
    with pytest.raises(SSLError, match="quantile"):
        self_label_loss([torch.rand(4, 3)] * 2, [torch.randn(4, 3)] * 2, quantile=1.5)


# ---- self-labelling ----------------------------------------------------------------------------------------
def plain_self_label(targets: list[np.ndarray], logits: list[np.ndarray], quantile: float) -> tuple[float, float]:
    """Official engine.py + SCAN's ConfidenceBasedCE, one process, written with loops."""
    B = targets[0].shape[0]
    conf, target, use_first = [], [], []
    for b in range(B):
        c1, c2 = targets[0][b].max(), targets[1][b].max()
        first = c1 > c2
        use_first.append(first)
        conf.append(c1 if first else c2)
        target.append(int(np.argmax(targets[0][b] if first else targets[1][b])))
    ranked = sorted(conf, reverse=True)
    threshold = ranked[min(int(quantile * B), B - 1)]
    kept = [b for b in range(B) if conf[b] > threshold]

    def ce(z, b):
        return -(z[b, target[b]] - np.log(np.exp(z[b]).sum()))

    terms = []
    strong = [logits[1][b] if use_first[b] else logits[0][b] for b in range(B)]
    terms.append(np.mean([ce(np.array(strong), b) for b in kept]) if kept else 0.0)
    for v in range(2, len(logits)):
        terms.append(np.mean([ce(logits[v], b) for b in kept]) if kept else 0.0)
    return float(sum(terms) / (len(logits) - 1)), float(threshold)


@pytest.mark.parametrize("quantile", [0.5, 0.55, 0.6, 1.0])
def test_self_label_loss_matches_plain_transcription(quantile):
    logits = random_probs(n_views=4, B=10, C=6, seed=4, requires_grad=True)
    targets = [z.detach().softmax(1) for z in logits[:2]]
    out = self_label_loss(targets, logits, quantile)
    want, threshold = plain_self_label([np_(t) for t in targets], [np_(z) for z in logits], quantile)
    assert float(out["loss"].detach()) == pytest.approx(want, abs=1e-10)
    assert float(out["threshold"]) == pytest.approx(threshold, abs=1e-12)
    assert float(out["kept"]) == pytest.approx(int(quantile * 10) / 10 if quantile < 1 else 0.9)
    out["loss"].backward()
    assert all(z.grad.abs().sum() > 0 for z in logits)


def test_self_label_nothing_kept_is_zero_with_graph():
    logits = [torch.zeros(4, 3, requires_grad=True) for _ in range(3)]  # all confidences tie: none above
    out = self_label_loss([z.detach().softmax(1) for z in logits[:2]], logits, 0.5)
    assert float(out["loss"]) == 0.0 and float(out["kept"]) == 0.0
    out["loss"].backward()


def test_quantile_schedule_is_official_cosine():
    N = 40  # official utils.cosine_scheduler(0.5, 0.6, epochs, niter) without warm-up
    iters = np.arange(N)
    official = 0.6 + 0.5 * (0.5 - 0.6) * (1 + np.cos(np.pi * iters / N))
    np.testing.assert_allclose([self_label_quantile(i, N) for i in range(N)], official, atol=1e-12)
    assert self_label_quantile(0, N) == 0.5 and self_label_quantile(N, N) == pytest.approx(0.6)


# ---- head and class probabilities -----------------------------------------------------------------------
def small_twist(**kw) -> TWIST:
    torch.manual_seed(0)
    kwargs = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0,
                  out_dim=16, hidden_dim=32)
    return TWIST(**(kwargs | kw))


def test_registered_and_nbs_switches_the_head():
    assert METHODS.get("twist") is TWIST
    on, off = small_twist(), small_twist(nbs=False)
    assert isinstance(on.head.norm, nn.BatchNorm1d) and not on.head.norm.affine and on.head.mlp[-1].bias is None
    assert isinstance(off.head.norm, nn.Identity) and off.head.mlp[-1].bias is not None
    kinds = [type(m).__name__ for m in on.head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    feats = torch.randn(12, on.backbone.num_features)
    z = on.head(feats)  # training mode: per class mean 0, std 1 over the batch
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    assert not torch.allclose(off.head(feats).std(0, unbiased=False), torch.ones(16), atol=1e-2)


def test_class_probabilities_shape_sum_and_eval_mode():
    model = small_twist()
    model.head(torch.randn(32, model.backbone.num_features) * 3)  # move the running statistics
    model.train()
    feats = torch.randn(5, model.backbone.num_features)
    probs = model.class_probabilities(feats)
    assert probs.shape == (5, 16) and not probs.requires_grad
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    assert model.head.training  # mode restored
    # eval-mode BN: a sample's probabilities do not depend on the rest of the batch
    torch.testing.assert_close(model.class_probabilities(feats[:1]), probs[:1])


# ---- DDP: 2 processes == 1 process on the global batch -----------------------------------------------------
B, D, C, V = 4, 6, 5, 4  # per-process batch, input dim, classes, views (2 global + 2 local)


class HeadLoss(nn.Module):
    """A linear class head in front of each loss, as DDP sees it (norm-free: BatchNorm is per-process)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(D, C)
        with torch.no_grad():
            self.linear.weight.mul_(3)
        self.mode = mode

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        logits = [self.linear(x) for x in xs]
        probs = [z.softmax(1) for z in logits]
        if self.mode == "multicrop":
            return multicrop_twist_loss(probs, lambda1=0.3, lambda2=1.0)["loss"]
        if self.mode == "teacher":
            return teacher_twist_loss([p.detach() ** 0.5 / (p.detach() ** 0.5).sum(1, keepdim=True) for p in probs[:2]],
                                      probs, lambda1=-0.6)["loss"]
        return self_label_loss([p.detach() for p in probs[:2]], logits, quantile=0.55)["loss"]


def global_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(WORLD * B, D, generator=g) for _ in range(V)]
    for x in xs:  # rank 0's images are the more confident ones: per-process thresholds would differ
        x[:B] *= 2
    return xs


def scenario_losses(rank: int, world: int, out: Path) -> dict:
    results = {}
    for mode in ("multicrop", "teacher", "self_label"):
        model = HeadLoss(mode)
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = ddp([x[rank * B:(rank + 1) * B] for x in global_inputs()])
        loss.backward()
        results[mode] = {"loss": loss.detach(), "grads": grads(model)}
    probs = HeadLoss("multicrop").linear(global_inputs()[0][rank * B:(rank + 1) * B]).softmax(1)
    results["diversity"] = diversity(probs).detach()
    return results


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp_twist", {"losses": scenario_losses}, {})


@pytest.mark.parametrize("mode", ["multicrop", "teacher", "self_label"])
def test_ddp_matches_single_process_on_global_batch(ddp, mode):
    results = [r[mode] for r in ddp("losses")]
    model = HeadLoss(mode)
    ref_loss = model(global_inputs())
    ref_loss.backward()
    ref = grads(model)
    assert ref.keys() == {"linear.weight", "linear.bias"}
    scale = float(max(g.abs().max() for g in ref.values()))
    assert scale > 1e-2
    losses = torch.stack([r["loss"] for r in results])
    # the loss does not scale with the number of processes: its mean over processes is the global loss
    torch.testing.assert_close(losses.mean(), ref_loss.detach(), atol=1e-6, rtol=1e-6)
    for r, res in enumerate(results):
        for name, g in ref.items():
            torch.testing.assert_close(res["grads"][name], g, atol=1e-6 * scale, rtol=1e-5, msg=lambda m, n=name: f"rank {r} {n}: {m}")
    # guard: the same losses on each process's half alone differ from the global-batch loss
    with torch.no_grad():
        halves = torch.stack([model([x[s:s + B] for x in global_inputs()]) for s in range(0, WORLD * B, B)])
    assert (halves.mean() - ref_loss).abs() > 1e-3


def test_ddp_diversity_uses_the_global_batch_mean(ddp):
    per_rank = [r["diversity"] for r in ddp("losses")]
    with torch.no_grad():
        want = diversity(HeadLoss("multicrop").linear(global_inputs()[0]).softmax(1))
    for value in per_rank:  # identical on every process: the mean distribution of the global batch
        torch.testing.assert_close(value, want, atol=1e-6, rtol=0)


# ---- through Lightning: both stages, lr schedule, exact resume with the momentum teacher --------------------
def _data() -> SSLDataModule:
    views = [ViewConfig(size=16, count=2, scale=(0.4, 1.0)), ViewConfig(size=8, count=2, scale=(0.05, 0.4))]
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16, views=views,
                         dataset_options={"size": 24, "image_size": 16, "channels": 1})


def _model(**kw) -> TWIST:
    L.seed_everything(0)
    kwargs = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10, out_dim=16,
                  hidden_dim=32, optimizer="adamw", lr=1e-3, self_label_lr=5e-4, warmup_epochs=1,
                  self_label_epochs=1, self_label_warmup_epochs=0.5)
    return TWIST(**(kwargs | kw))


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs = [g["lr"] for g in optimizer.param_groups]  # the lr of this step
        self.wds = [g["weight_decay"] for g in optimizer.param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.rows.append((trainer.current_epoch, trainer.global_step, logged, self.lrs, self.wds))


def _fit(model, callbacks=(), max_epochs=2) -> L.Trainer:
    return fit(model, _data(), callbacks=callbacks, max_epochs=max_epochs, log_every_n_steps=1)


def test_training_runs_both_stages_with_staged_lr():
    rec = Recorder()
    _fit(_model(weight_decay=0.04, weight_decay_end=0.4), [rec])  # 2 epochs x 3 steps: main stage, self-labelling
    assert len(rec.rows) == 6
    for epoch, _, logged, _, _ in rec.rows:
        assert all(np.isfinite(v) for v in logged.values())
    main_terms = {"train/consistency", "train/sharpness", "train/diversity", "train/std_col", "train/std_row"}
    assert main_terms <= rec.rows[0][2].keys()
    assert {"train/threshold", "train/kept", "train/quantile"} <= rec.rows[-1][2].keys()
    assert "train/quantile" not in rec.rows[2][2]
    # quantile: 0.5 at the stage's first step, cosine towards 0.6
    assert rec.rows[3][2]["train/quantile"] == pytest.approx(0.5)
    assert rec.rows[5][2]["train/quantile"] == pytest.approx(self_label_quantile(2, 3))
    # lr: 1e-3 per 256 with a 3-step warm-up over the 3 main-stage steps; then self_label_lr 5e-4 per 256
    # with its own 2-step (0.5 epoch, rounded) warm-up and cosine over the 3 self-labelling steps
    for epoch, step, _, lrs, wds in rec.rows:
        s = step - 1  # global_step after this step's update
        want = 1e-3 * 8 / 256 * warmup_cosine(s, 3, 3) if s < 3 else 5e-4 * 8 / 256 * warmup_cosine(s - 3, 2, 3)
        assert lrs[0] == pytest.approx(want, rel=1e-6), (step, lrs)
        # weight decay (ViT recipe): cosine 0.04 -> 0.4 over all 6 steps on the decayed group only
        assert wds[0] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * s / 6)))
        assert all(w == 0 for w in wds[1:])


def _perturb(model: TWIST) -> None:  # restored state must not depend on init
    with torch.no_grad():
        for p in model.teacher_head.parameters():
            p.normal_()


def test_exact_resume_with_momentum_teacher(tmp_path):
    # student, teacher, head BN statistics, probe and optimizer state bit-identical after resuming
    straight, *_ = check_resume_is_exact(lambda: _model(momentum_teacher=True, momentum_base=0.9), _data, tmp_path,
                                         perturb=_perturb, log_every_n_steps=1)
    sd_a = straight.state_dict()
    assert any(k.startswith("teacher_head.") for k in sd_a)
    assert any(k.startswith("teacher_backbone.") for k in sd_a)
    assert not torch.equal(sd_a["teacher_head.mlp.0.weight"], sd_a["head.mlp.0.weight"])  # EMA lags the student


def test_self_label_epochs_must_leave_a_main_stage():
    model = _model(self_label_epochs=2)
    with pytest.raises(SSLError, match="self_label_epochs"):
        _fit(model)
