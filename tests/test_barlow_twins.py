"""Barlow Twins: loss against the paper's formula and lightly, heads, errors, and 2-process DDP
(same loss and gradients as one process on the global batch)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_lightning.losses.joint_embedding.barlow_twins import barlow_twins_loss
from ssl_lightning.methods.joint_embedding.barlow_twins import BarlowTwins
from ssl_lightning.registry import SSLError

from ddp_utils import (WORLD, assert_grads_match, ddp_loss_backward, grads, norm_free_two_view,  # tests/ is on sys.path
                       single_process_reference, spawn_results, two_view_batch)

LAMBD = 0.0051


def barlow_reference(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float) -> torch.Tensor:
    """Algorithm 1 of the paper, entry by entry: BN without affine (biased variance, eps 1e-5),
    C_ij = sum_b zA_bi zB_bj / N, L = sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2."""
    n, d = z_a.shape
    a = (z_a - z_a.mean(0)) / torch.sqrt(z_a.var(0, unbiased=False) + 1e-5)
    b = (z_b - z_b.mean(0)) / torch.sqrt(z_b.var(0, unbiased=False) + 1e-5)
    loss = z_a.new_zeros(())
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss = loss + ((1 - c_ij) ** 2 if i == j else lambd * c_ij**2)
    return loss


def _inputs(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=g) * 2 + 1
    return z_a.requires_grad_(), (0.7 * z_a.detach() + torch.randn(n, d, generator=g)).requires_grad_()


@pytest.mark.parametrize("n,d", [(6, 4), (10, 7)])
def test_barlow_twins_loss_matches_plain_formula(n, d):
    z_a, z_b = _inputs(n, d)
    got = barlow_twins_loss(z_a, z_b, LAMBD)
    want = barlow_reference(z_a, z_b, LAMBD)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    g_got = torch.autograd.grad(got, (z_a, z_b))
    g_want = torch.autograd.grad(barlow_reference(z_a, z_b, LAMBD), (z_a, z_b))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_barlow_twins_loss_matches_lightly_in_one_process():
    """lightly.loss.BarlowTwinsLoss agrees in one process (given lambda 0.0051: lightly's default is 5e-3).

    Difference under DDP (documented here): lightly with ``gather_distributed`` batch-normalises each
    process's embeddings with that process's own mean and variance and averages the per-process
    matrices C; we normalise with the GLOBAL batch's statistics (as the official code's SyncBatchNorm
    does), so lightly's distributed loss is not the single-process loss on the global batch. Shown on
    two halves of a batch below."""
    from lightly.loss import BarlowTwinsLoss

    z_a, z_b = _inputs(32, 16)
    torch.testing.assert_close(barlow_twins_loss(z_a, z_b, LAMBD), BarlowTwinsLoss(lambda_param=LAMBD)(z_a, z_b),
                               atol=1e-5, rtol=1e-6)
    c_halves = []
    for h in (slice(0, 16), slice(16, 32)):  # what lightly computes on 2 processes of 16 each
        a, b = (nn.functional.batch_norm(z[h], None, None, training=True) for z in (z_a, z_b))
        c_halves.append(a.T @ b / 16)
    c = torch.stack(c_halves).mean(0)
    off = c - torch.diag(torch.diagonal(c))
    lightly_ddp = (1 - torch.diagonal(c)).pow(2).sum() + LAMBD * off.pow(2).sum()
    assert (lightly_ddp - barlow_twins_loss(z_a, z_b, LAMBD)).abs() > 1e-3


def test_barlow_twins_loss_optimum_and_invariances():
    z = torch.randn(64, 8)
    z = (z - z.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T, correction=0))).T  # whitened
    assert barlow_twins_loss(z, z, LAMBD) < 1e-3  # identical whitened views: C = I
    # BN makes the loss invariant to a per-dimension affine map of either embedding
    z_a, z_b = _inputs(16, 5)
    scaled = z_a.detach() * torch.tensor([3.0, 0.5, 2.0, 1.0, 7.0]) - 4
    torch.testing.assert_close(barlow_twins_loss(scaled, z_b.detach()), barlow_twins_loss(z_a.detach(), z_b.detach()),
                               atol=1e-4, rtol=1e-5)


def test_barlow_twins_errors():
    with pytest.raises(SSLError, match="same shape"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(SSLError, match="at least 2 samples.*batch_size"):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3))


def test_barlow_twins_heads_and_bias_lr_group():
    model = BarlowTwins(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0,
                        proj_hidden=32, proj_out=24)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model.projector[-1].bias is None and model.projector[-1].out_features == 24
    assert model.extra_param_groups() == []  # default: biases share the weights' lr

    model = BarlowTwins(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=3,
                        proj_hidden=32, proj_out=24, lr_biases=0.0048)
    model.global_batch_size = lambda: 512  # no trainer here
    (group,) = model.extra_param_groups()
    assert group["lr"] == pytest.approx(0.0048 * 2) and group["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in group["params"])
    assert not {id(p) for p in model.probe.parameters()} & {id(p) for p in group["params"]}


# ---- DDP: 2 processes == 1 process on the global batch ------------------------------------------------
B, IMAGE = 4, 16  # images per process


def build_model() -> BarlowTwins:
    return norm_free_two_view(BarlowTwins)


def scenario_barlow_twins(rank: int, world: int, out: Path) -> dict:
    model = build_model()
    loss = ddp_loss_backward(model, out / "init.pt", [v[rank * B:(rank + 1) * B] for v in two_view_batch(B, IMAGE)])
    return {"loss": loss, "grads": grads(model)}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp_barlow", {"barlow_twins": scenario_barlow_twins}, {"init.pt": build_model})


def test_barlow_twins_ddp_matches_single_process(ddp):
    results = ddp("barlow_twins")
    model, views = build_model(), two_view_batch(B, IMAGE)
    ref_loss, ref, scale = single_process_reference(model, ddp.out / "init.pt", views)
    for res in results:
        torch.testing.assert_close(res["loss"], ref_loss, atol=1e-5, rtol=1e-6)  # every rank: the global loss
    assert_grads_match(results, ref, scale)  # in particular NOT ref / world_size
    # guard: per-process statistics (no gather) would give a different loss
    with torch.no_grad():
        z = [model.projector(f) for f in model.forward_views(views)]
        local = torch.stack([barlow_twins_loss(z[0][s:s + B], z[1][s:s + B], LAMBD) for s in range(0, WORLD * B, B)])
    assert (local.mean() - ref_loss).abs() > 1e-2
