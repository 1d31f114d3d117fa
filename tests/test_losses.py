"""Fidelity of the loss functions against plain transcriptions of the paper formulas and lightly."""
from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import NTXentLoss

from ssl_lightning.losses import byol_loss, nt_xent


CASES = [(1, 4), (2, 3), (5, 8), (8, 16), (16, 32)]
TEMPERATURES = [0.1, 0.5]


def _cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum() / (u.pow(2).sum().sqrt() * v.pow(2).sum().sqrt())


def nt_xent_reference(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR, written as a double loop: views 0..N-1 are z_a, N..2N-1 are z_b, the positive of i is
    i +- N; l(i, j) = -log exp(cos(z_i, z_j)/T) / sum_{k != i} exp(cos(z_i, z_k)/T), mean over 2N."""
    n = z_a.shape[0]
    z = [z_a[i] for i in range(n)] + [z_b[i] for i in range(n)]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        numerator = torch.exp(_cos(z[i], z[j]) / temperature)
        denominator = 0.0
        for k in range(2 * n):
            if k != i:
                denominator = denominator + torch.exp(_cos(z[i], z[k]) / temperature)
        total = total - torch.log(numerator / denominator)
    return total / (2 * n)


def _inputs(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,d", CASES)
def test_nt_xent_matches_plain_formula_value_and_gradient(n, d, temperature):
    z_a, z_b = _inputs(n, d, seed=1000 * n + d)
    # the package in float32, the reference in float64 (ground truth)
    a32, b32 = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    a64, b64 = z_a.double().requires_grad_(), z_b.double().requires_grad_()
    loss = nt_xent(a32, b32, temperature)
    ref = nt_xent_reference(a64, b64, temperature)
    assert loss.shape == ()
    assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a32.grad.double(), a64.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(b32.grad.double(), b64.grad, atol=1e-5, rtol=0)
    assert a32.grad.abs().sum() > 0 or n == 1


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,d", CASES)
def test_nt_xent_matches_lightly(n, d, temperature):
    z_a, z_b = _inputs(n, d, seed=7 + n * d)
    a1, b1 = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    a2, b2 = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    ours = nt_xent(a1, b1, temperature)
    theirs = NTXentLoss(temperature=temperature)(a2, b2)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(b1.grad, b2.grad, atol=1e-5, rtol=0)


def test_nt_xent_is_scale_invariant_and_symmetric():
    z_a, z_b = _inputs(6, 10, seed=3)
    base = nt_xent(z_a, z_b, 0.2)
    # cosine similarity: rescaling each row changes nothing
    scales = torch.rand(6, 1) * 5 + 0.1
    torch.testing.assert_close(nt_xent(z_a * scales, z_b * 3.0, 0.2), base, atol=1e-5, rtol=0)
    # averaged over all 2N anchors, so swapping the two views changes nothing
    torch.testing.assert_close(nt_xent(z_b, z_a, 0.2), base, atol=1e-6, rtol=0)
    # a batch permutation (applied to both views) changes nothing either
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nt_xent(z_a[perm], z_b[perm], 0.2), base, atol=1e-6, rtol=0)


def test_nt_xent_limits():
    # identical views of mutually orthogonal images: each positive at cos 1, every negative at cos 0
    n, d, t = 4, 8, 0.5
    z = torch.eye(d)[:n]
    # for anchor i: positive cos 1; negatives: 2(n-1) views at cos 0 -> -log e^{1/T}/(e^{1/T} + 2(n-1))
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * (n - 1)))
    assert abs(nt_xent(z, z.clone(), t).item() - expected) < 1e-5


def byol_reference(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for i in range(p.shape[0]):
        total = total + 2 - 2 * _cos(p[i], z[i])
    return total / p.shape[0]


@pytest.mark.parametrize("n,d", [(1, 3), (7, 16), (32, 64)])
def test_byol_loss_matches_plain_formula(n, d):
    g = torch.Generator().manual_seed(n + d)
    p0, z0 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    p, z = p0.clone().requires_grad_(), z0.clone().requires_grad_()
    loss = byol_loss(p, z)
    p_ref = p0.double().requires_grad_()
    ref = byol_reference(p_ref, z0.double())
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    ref.backward()
    assert z.grad is None, "the target must be detached (stop-gradient)"
    assert p.grad is not None
    torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=1e-5, rtol=0)


def test_byol_loss_range_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(10, 5, generator=g), torch.randn(10, 5, generator=g)
    assert abs(byol_loss(p, p).item()) < 1e-6
    assert abs(byol_loss(p, -p).item() - 4.0) < 1e-6
    torch.testing.assert_close(byol_loss(p * 3, z * 0.2), byol_loss(p, z))
