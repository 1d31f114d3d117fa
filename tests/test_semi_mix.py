"""VAT, MixMatch and FixMatch: their losses against plain transcriptions of the formulas (loops over samples
and classes written here), USB's ``semilearn`` where conventions match (loaded by path, see
test_semi_pieces.py), VAT's direction against a finite-difference Hessian, BatchNorm statistics, and a
training step of each method through Lightning."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.losses.semi_supervised import (adversarial_direction, fixmatch_loss, guess_labels, mixmatch_loss,
                                                  normalise_per_sample, vat_loss)
from ssl_lightning.semi import frozen_bn_stats

from test_semi_pieces import softmax_rows, usb  # noqa: F401  (usb: the semilearn fixture)

B, C = 6, 5


def logits_of(seed: int, b: int = B, c: int = C, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def plain_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """mean_b sum_c p log(p / q) with p = softmax(p_logits), by hand."""
    p, q = softmax_rows(p_logits), softmax_rows(q_logits)
    return sum(sum(pc * math.log(pc / qc) for pc, qc in zip(pr, qr)) for pr, qr in zip(p, q)) / len(p)


# ---- VAT ------------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A smooth per-sample network (no normalisation), float64, for the Hessian check."""

    def __init__(self, d_in: int = 4, classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(d_in, 8, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(8, classes, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


def test_normalise_per_sample_is_the_two_step_vat_tf_normalisation():
    d = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = normalise_per_sample(d)
    for i in range(3):
        flat = d[i].flatten().tolist()
        m = max(abs(v) for v in flat)
        step1 = [v / (1e-12 + m) for v in flat]
        norm = math.sqrt(1e-6 + sum(v * v for v in step1))
        torch.testing.assert_close(out[i].flatten(), torch.tensor([v / norm for v in step1], dtype=torch.float64))
    assert torch.allclose(out.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-5)


def fd_hessian(f, x0: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    """Central finite differences of the scalar r -> f(r) at r = 0 (the KL's values only, no autograd)."""
    n = x0.numel()
    e = torch.eye(n, dtype=torch.float64) * h
    hess = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            hess[i, j] = (f(e[i] + e[j]) - f(e[i] - e[j]) - f(-e[i] + e[j]) + f(-e[i] - e[j])) / (4 * h * h)
    return hess


def test_vat_direction_is_the_dominant_eigenvector_of_the_kl_hessian():
    net = TinyNet()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    clean = net(x)
    d0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    one_step = adversarial_direction(net, x, clean, xi=1e-6, power_iterations=1, d=d0)
    many = adversarial_direction(net, x, clean, xi=1e-6, power_iterations=60, d=d0)
    for b in range(3):
        def kl(r, b=b):
            with torch.no_grad():
                return plain_kl(clean[b:b + 1], net(x[b:b + 1] + r.view(1, -1)))
        hess = fd_hessian(kl, x[b])
        torch.testing.assert_close(hess, hess.T, atol=1e-5, rtol=1e-4)
        values, vectors = torch.linalg.eigh(hess)
        assert values[-1] > 2 * values[-2].abs()  # a clear dominant direction for this seed
        top = vectors[:, -1]
        assert abs(float(many[b] @ top)) > 0.999  # the power iteration converges to it
        hd = hess @ normalise_per_sample(d0)[b]  # one power iteration = H d, normalised
        assert abs(float(one_step[b] @ (hd / hd.norm()))) > 0.999


def test_vat_loss_is_the_kl_at_eps_r_adv_with_clean_logits_detached():
    net = TinyNet()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d0 = torch.randn(4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    clean = net(x)
    loss = vat_loss(net, x, clean, eps=0.7, xi=1e-6, d=d0)
    r = 0.7 * adversarial_direction(net, x, clean, xi=1e-6, d=d0)
    assert torch.allclose(r.norm(dim=1), torch.full((4,), 0.7, dtype=torch.float64), atol=1e-5)
    assert loss.item() == pytest.approx(plain_kl(clean.detach(), net(x + r).detach()), rel=1e-9)
    loss.backward()  # through the perturbed pass only: the clean logits' graph gets nothing
    assert net.w1.grad is not None and net.w1.grad.abs().sum() > 0
    assert loss.item() > 0


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def bn_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def test_vat_extra_passes_leave_batchnorm_statistics_untouched():
    net = bn_net().train()
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(5)) * 2 + 1
    before = bn_state(net)
    with frozen_bn_stats(net):
        clean = net(x)  # normalised with this batch's statistics, as in train mode ...
        loss = vat_loss(net, x, clean, eps=1.0, xi=1e-2)
    after = bn_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)  # ... but nothing folded in
    assert loss.item() > 0
    assert [m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)] == [0.1]
    net(x)  # outside the block the statistics move again (the labelled pass)
    assert not torch.equal(bn_state(net)["1.running_mean"], before["1.running_mean"])
    torch.testing.assert_close(clean, bn_net().train()(x))  # batch statistics were used inside


# ---- MixMatch -------------------------------------------------------------------------------------------------
def test_guess_labels_averages_k_softmaxes_then_sharpens():
    logits = [logits_of(10 + k) for k in range(3)]
    got = guess_labels(logits, temperature=0.5)
    probs = [softmax_rows(z) for z in logits]
    for b in range(B):
        avg = [sum(probs[k][b][c] for k in range(3)) / 3 for c in range(C)]
        powered = [a ** 2 for a in avg]
        torch.testing.assert_close(got[b], torch.tensor([p / sum(powered) for p in powered], dtype=torch.float32))
    assert not got.requires_grad


def test_mixmatch_losses_match_their_formulas(usb):  # noqa: F811
    logits_x, logits_u = logits_of(20), logits_of(21, b=2 * B)
    targets_x, targets_u = torch.softmax(logits_of(22), 1), torch.softmax(logits_of(23, b=2 * B), 1)
    lx, lu = mixmatch_loss(logits_x, targets_x, logits_u, targets_u)
    px, pu = softmax_rows(logits_x), softmax_rows(logits_u)
    want_x = -sum(sum(t * math.log(p) for t, p in zip(tr, pr)) for tr, pr in zip(targets_x.tolist(), px)) / B
    want_u = sum(sum((t - p) ** 2 for t, p in zip(tr, pr)) for tr, pr in zip(targets_u.tolist(), pu)) / (2 * B * C)
    assert lx.item() == pytest.approx(want_x, rel=1e-10)
    assert lu.item() == pytest.approx(want_u, rel=1e-10)
    criterions, _ = usb  # semilearn's MixMatch: ce_loss(soft) for L_x, consistency_loss(mse) for L_u
    torch.testing.assert_close(lx, criterions.ce_loss(logits_x, targets_x, reduction="mean"))
    torch.testing.assert_close(lu, criterions.consistency_loss(logits_u, targets_u, "mse"))


# ---- FixMatch -------------------------------------------------------------------------------------------------
def test_fixmatch_loss_is_masked_ce_over_all_unlabelled(usb):  # noqa: F811
    weak, strong = logits_of(30, b=4 * B, scale=6.0), logits_of(31, b=4 * B)
    loss, mask, labels = fixmatch_loss(weak, strong, threshold=0.95)
    pw, ps = softmax_rows(weak), softmax_rows(strong)
    want, kept = 0.0, []
    for b in range(4 * B):
        top = max(pw[b])
        y = pw[b].index(top)
        kept.append(top >= 0.95)
        assert labels[b] == y
        if top >= 0.95:
            want -= math.log(ps[b][y])
    assert 0 < sum(kept) < 4 * B  # some kept, some masked: the denominator matters
    assert mask.tolist() == [float(k) for k in kept]
    assert loss.item() == pytest.approx(want / (4 * B), rel=1e-10)
    criterions, _ = usb
    torch.testing.assert_close(loss, criterions.consistency_loss(strong, labels, "ce", mask))
    weak.requires_grad_(True)
    fixmatch_loss(weak, strong.requires_grad_(True))[0].backward()
    assert weak.grad is None  # the pseudo-labels are a stop-gradient


# ---- the methods ----------------------------------------------------------------------------------------------
import lightning as L  # noqa: E402

from ssl_lightning.data import SemiSupervisedDataModule  # noqa: E402
from ssl_lightning.methods import METHODS, VAT, FixMatch, MixMatch  # noqa: E402
from ssl_lightning.methods.semi_supervised import SemiBatch  # noqa: E402
from ssl_lightning.registry import SSLError  # noqa: E402
from ssl_lightning.semi import interleave  # noqa: E402

TINY = dict(backbone="convnet", backbone_kwargs={"width": 4}, in_channels=3)
VIEWS = {FixMatch: dict(unlabelled_views=["weak", "strong"]), MixMatch: dict(unlabelled_views=["weak"], k_unlabelled=2),
         VAT: dict(unlabelled_views=["weak"])}


def make_dm(**kwargs) -> SemiSupervisedDataModule:
    defaults = dict(dataset="synthetic", dataset_options={"size": 60, "image_size": 8}, labels_per_class=1,
                    num_val=10, batch_size=4, mu=2, num_workers=0, pin_memory=False, eval_batch_size=32)
    return SemiSupervisedDataModule(**{**defaults, **kwargs})


def fit(tmp_path, model, dm, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    return trainer


def bn_stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if ("running" in k or "num_batches" in k) and not k.startswith("ema_")}


@pytest.mark.parametrize("cls", [FixMatch, MixMatch, VAT])
def test_training_steps_through_lightning(tmp_path, cls):
    model = cls(**TINY)
    assert METHODS.get(cls.__name__.lower()) is cls
    dm = make_dm(**VIEWS[cls])
    trainer = fit(tmp_path, model, dm)
    metrics = dict(trainer.callback_metrics)
    assert trainer.global_step == 2
    assert torch.isfinite(metrics["train/loss"]) and "train/unlabelled_loss" in metrics
    assert not torch.equal(model.classifier.weight, model.ema_classifier.weight if model.ema_classifier is not None
                           else torch.zeros_like(model.classifier.weight))
    assert "test/acc" in trainer.validate(model, datamodule=dm, verbose=False)[-1]
    extra = {FixMatch: "train/mask_rate", MixMatch: "train/unlabelled_weight", VAT: "train/vat_loss"}[cls]
    assert extra in metrics


def test_mixmatch_interleaved_forward_keeps_one_batch_of_every_source():
    torch.manual_seed(0)
    model = MixMatch(num_classes=5, **TINY)
    k, b = 2, 6
    batches = [torch.randn(b, 3, 8, 8) + 10 * i for i in range(1 + k)]  # source i: pixels around 10 i
    kept = []
    bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    bn.register_forward_hook(lambda mod, args, out: kept.append((args[0].shape[0], mod.momentum)))
    model.eval()  # per-sample outputs: the interleaved forward must return each sample's own logits, in order
    torch.testing.assert_close(model.mixed_logits(batches), model.logits(torch.cat(batches)))
    model.train()
    seen = []
    model.backbone.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    state = bn_stats(model)
    kept.clear()
    model.mixed_logits(batches)
    first = seen[0].mean(dim=(1, 2, 3)).round(decimals=-1) / 10  # the source of each row of the kept batch
    assert set(first.tolist()) == {0.0, 1.0, 2.0}  # the one kept forward holds every source
    assert [m for _, m in kept] == [0.1, 0.0, 0.0]  # only the first forward folds its statistics in
    with torch.no_grad():  # and the running statistics are those of that batch alone
        reference = MixMatch(num_classes=5, **TINY)
        reference.load_state_dict({**model.state_dict(), **state})
        reference.train().logits(interleave(batches)[0])
    for key, value in bn_stats(reference).items():
        torch.testing.assert_close(bn_stats(model)[key], value)


def semi_batch(b: int = 4, mu: int = 2, views: int = 2, seed: int = 0) -> SemiBatch:
    g = torch.Generator().manual_seed(seed)
    return SemiBatch(torch.randn(b, 3, 8, 8, generator=g), torch.randint(5, (b,), generator=g), torch.arange(b),
                     [torch.randn(mu * b, 3, 8, 8, generator=g) for _ in range(views)], torch.arange(mu * b))


def outside_fit(model, weight: float = 1.0):
    """``objective`` outside a fit: a fixed unlabelled weight (it reads the trainer's step otherwise); logging
    without a trainer is a no-op."""
    model.unlabelled_weight = lambda: weight
    return model


def test_mixmatch_label_guess_passes_leave_bn_statistics_and_loss_formula():
    torch.manual_seed(0)
    model = outside_fit(MixMatch(num_classes=5, alpha=0.75, **TINY).train(), 75.0 * 0.1 / 0.4)
    batch = semi_batch(views=2, mu=1)
    torch.manual_seed(1)
    terms = model.objective(batch)
    assert terms["loss"].item() == pytest.approx(
        terms["supervised_loss"].item() + 75.0 * 0.1 / 0.4 * terms["unlabelled_loss"].item(), rel=1e-6)
    # the same step by hand: guess, per-example MixUp (same RNG draws), losses of the mixed batches
    torch.manual_seed(0)
    ref = MixMatch(num_classes=5, **TINY).train()
    with torch.no_grad(), frozen_bn_stats(ref):
        probs = torch.stack([torch.softmax(ref.logits(v), 1) for v in batch.views]).mean(0)
    guess = probs.pow(2) / probs.pow(2).sum(1, keepdim=True)
    targets = torch.cat([F.one_hot(batch.y, 5).float(), guess, guess])
    torch.manual_seed(1)
    from ssl_lightning.semi import mixup

    mixed = mixup(torch.cat([batch.x, *batch.views]), targets, 0.75)
    assert (mixed.lam >= 0.5).all() and mixed.lam.unique().numel() > 1  # per example, lambda' = max(l, 1 - l)
    logits = ref.mixed_logits(list(mixed.inputs.split(4)))
    lx = -(mixed.targets[:4] * torch.log_softmax(logits[:4], 1)).sum(1).mean()
    lu = (mixed.targets[4:] - torch.softmax(logits[4:], 1)).pow(2).mean()
    assert terms["supervised_loss"].item() == pytest.approx(lx.item(), rel=1e-5)
    assert terms["unlabelled_loss"].item() == pytest.approx(lu.item(), rel=1e-5)
    torch.testing.assert_close(bn_stats(model), bn_stats(ref))


def test_vat_only_the_labelled_pass_moves_bn_statistics():
    torch.manual_seed(0)
    model = outside_fit(VAT(num_classes=5, eps=2.0, xi=1e-2, **TINY).train())
    batch = semi_batch(views=1)
    terms = model.objective(batch)
    torch.manual_seed(0)
    ref = VAT(num_classes=5, **TINY).train()
    ref.logits(batch.x)  # the labelled pass alone
    torch.testing.assert_close(bn_stats(model), bn_stats(ref))
    assert terms["vat_loss"].item() > 0
    assert terms["unlabelled_loss"].item() == pytest.approx(terms["vat_loss"].item() + terms["entropy"].item(), rel=1e-6)
    terms["loss"].backward()
    assert model.classifier.weight.grad.abs().sum() > 0


def test_fixmatch_objective_is_one_forward_and_its_formula():
    torch.manual_seed(0)
    model = outside_fit(FixMatch(num_classes=5, threshold=0.3, **TINY).train(), 2.0)
    sizes = []
    model.backbone.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    batch = semi_batch(views=2)
    terms = model.objective(batch)
    assert sizes == [4 + 2 * 8]  # labelled + weak + strong in one pass
    weak, strong = batch.view_logits
    want, mask, _ = fixmatch_loss(weak, strong, 0.3)
    assert 0 < mask.sum() < 8
    assert terms["mask_rate"].item() == pytest.approx(mask.mean().item())
    ce = F.cross_entropy(batch.logits, batch.y)
    assert terms["loss"].item() == pytest.approx((ce + 2.0 * want).item(), rel=1e-6)


@pytest.mark.parametrize("cls, kwargs, views, match", [
    (FixMatch, {"threshold": 1.5}, None, r"threshold=1.5"),
    (MixMatch, {"temperature": 0.0}, None, r"temperature=0.0"),
    (VAT, {"eps": 0.0}, None, r"eps=0.0"),
    (FixMatch, {}, 1, r"data.unlabelled_views: \[weak, strong\]"),
    (VAT, {}, 2, r"data.unlabelled_views: \[weak\] and data.k_unlabelled: 1"),
    (MixMatch, {}, 0, r"data.k_unlabelled: 2"),
])
def test_clear_errors(cls, kwargs, views, match):
    with pytest.raises(SSLError, match=match):
        outside_fit(cls(num_classes=5, **TINY, **kwargs)).objective(semi_batch(views=views))


def test_mixmatch_refuses_unlabelled_views_not_a_multiple_of_the_batch():
    model = outside_fit(MixMatch(num_classes=5, **TINY))
    batch = semi_batch(views=2)
    batch.views = [v[:5] for v in batch.views]
    with pytest.raises(SSLError, match="integer data.mu"):
        model.objective(batch)


def test_mixmatch_resumes_exactly(tmp_path):
    """MixMatch draws its partners and lambdas from the global RNG every step, and carries an EMA model: a
    resumed run equals one that never stopped, bit for bit."""
    from resume_utils import check_resume_is_exact
    from test_semi_methods import _perturb_everything, _seeded

    data = lambda: make_dm(unlabelled_views=["weak"], k_unlabelled=2, mu=1,  # noqa: E731
                           dataset_options={"size": 40, "image_size": 8}, num_val=0)
    runs = check_resume_is_exact(_seeded(MixMatch, num_classes=10, rampup_length=4), data, tmp_path,
                                 perturb=_perturb_everything, default_root_dir=tmp_path)
    assert not torch.equal(runs.resumed.ema_classifier.weight, runs.resumed.classifier.weight)


def test_tf_ema_warmup(tmp_path):
    from ssl_lightning.semi import ema_warmup_decay

    assert ema_warmup_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_warmup_decay(90, 0.999) == pytest.approx(91 / 100)
    assert ema_warmup_decay(9000, 0.999) == 0.999 and ema_warmup_decay(8000, 0.999) < 0.999
    model = FixMatch(num_classes=10, ema_warmup="tf", **TINY)
    before = {k: v.clone() for k, v in model.classifier.state_dict().items()}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.student = {k: v.clone() for k, v in pl_module.classifier.state_dict().items()}

    snap = Snapshot()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, accelerator="cpu", logger=False, callbacks=[snap],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=make_dm(**VIEWS[FixMatch]))
    m = ema_warmup_decay(1, 0.999)  # the update after the first step (global_step 1): 2 / 11
    for k, v in model.ema_classifier.state_dict().items():
        torch.testing.assert_close(v, m * before[k] + (1 - m) * snap.student[k])
    with pytest.raises(SSLError, match="ema_warmup='yes'"):
        FixMatch(num_classes=10, ema_warmup="yes", **TINY)
