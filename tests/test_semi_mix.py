"""VAT, MixMatch and FixMatch: their losses against plain transcriptions of the formulas (loops over samples
and classes written here), USB's ``semilearn`` where conventions match (loaded by path, see
test_semi_pieces.py), VAT's direction against a finite-difference Hessian, BatchNorm statistics, and a
training step of each method through Lightning."""
from __future__ import annotations

import math

import pytest
import torch
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
