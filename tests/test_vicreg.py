"""VICReg: loss against the official main_vicreg.py formula and lightly, terms, errors, and 2-process
DDP (same loss and gradients as one process on the global batch)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_lightning.losses.joint_embedding.vicreg import covariance_loss, invariance_loss, variance_loss, vicreg_loss
from ssl_lightning.methods.joint_embedding.vicreg import VICReg
from ssl_lightning.registry import SSLError

from ddp_utils import (WORLD, assert_grads_match, ddp_loss_backward, grads, norm_free_two_view,  # tests/ is on sys.path
                       single_process_reference, spawn_results, two_view_batch)


def vicreg_reference(x: torch.Tensor, y: torch.Tensor, sim: float = 25.0, std: float = 25.0, cov: float = 1.0):
    """facebookresearch/vicreg main_vicreg.py VICReg.forward, written out plainly (one process)."""
    n, d = x.shape
    repr_loss = ((x - y) ** 2).sum() / (n * d)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt((x**2).sum(0) / (n - 1) + 0.0001)
    std_y = torch.sqrt((y**2).sum(0) / (n - 1) + 0.0001)
    std_loss = torch.clamp(1 - std_x, min=0).mean() / 2 + torch.clamp(1 - std_y, min=0).mean() / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return sim * repr_loss + std * std_loss + cov * cov_loss, (repr_loss, std_loss, cov_loss)


def _inputs(n: int, d: int, seed: int = 0, scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * scale * torch.linspace(0.2, 3, d)  # some dims below, some above std 1
    return x.requires_grad_(), (x.detach() + 0.3 * torch.randn(n, d, generator=g)).requires_grad_()


@pytest.mark.parametrize("n,d", [(8, 4), (32, 16)])
def test_vicreg_loss_matches_official_formula(n, d):
    z_a, z_b = _inputs(n, d)
    out = vicreg_loss(z_a, z_b)
    want, (inv, var, cov) = vicreg_reference(z_a, z_b)
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=1e-6)
    for name, ref in [("invariance", inv), ("variance", var), ("covariance", cov)]:
        torch.testing.assert_close(out[name], ref.detach(), atol=1e-6, rtol=1e-6)
    assert 0 < float(var.detach()) and 0 < float(cov.detach())  # every term active
    g_got = torch.autograd.grad(out["loss"], (z_a, z_b))
    g_want = torch.autograd.grad(vicreg_reference(z_a, z_b)[0], (z_a, z_b))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_vicreg_terms_match_lightly():
    """lightly.loss.VICRegLoss and its term functions agree (same /2 on variance, sum on covariance;
    with gather_distributed lightly also gathers with gradient and keeps the invariance local)."""
    from lightly.loss import VICRegLoss
    from lightly.loss import vicreg_loss as lightly_vicreg

    z_a, z_b = _inputs(24, 10, seed=3)
    coeffs = dict(sim_coeff=10.0, std_coeff=20.0, cov_coeff=3.0)
    torch.testing.assert_close(vicreg_loss(z_a, z_b, **coeffs)["loss"],
                               VICRegLoss(lambda_param=10.0, mu_param=20.0, nu_param=3.0)(z_a, z_b), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(invariance_loss(z_a, z_b), lightly_vicreg.invariance_loss(z_a, z_b))
    torch.testing.assert_close(variance_loss(z_a), lightly_vicreg.variance_loss(z_a))
    torch.testing.assert_close(covariance_loss(z_a), lightly_vicreg.covariance_loss(z_a))


def test_vicreg_term_limits():
    z = torch.randn(256, 8) * 3
    assert variance_loss(z) == 0  # std above 1 everywhere: no variance penalty
    assert variance_loss(torch.zeros(5, 8)) == pytest.approx(1 - 1e-2)  # collapsed: 1 - sqrt(eps)
    assert covariance_loss(torch.randn(4, 1).repeat(1, 3)) > 0  # perfectly correlated dimensions
    assert invariance_loss(z, z) == 0


def test_vicreg_errors():
    with pytest.raises(SSLError, match="same shape"):
        vicreg_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(SSLError, match="at least 2 samples.*batch_size"):
        vicreg_loss(torch.randn(1, 3), torch.randn(1, 3))


def test_vicreg_expander_layout():
    model = VICReg(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0,
                   proj_hidden=32, proj_out=24)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model.projector[-1].bias is None and model.projector[-1].out_features == 24
    assert (model.hparams.sim_coeff, model.hparams.std_coeff, model.hparams.cov_coeff) == (25.0, 25.0, 1.0)


# ---- DDP: 2 processes == 1 process on the global batch ------------------------------------------------
B, IMAGE = 4, 16  # images per process


def build_model() -> VICReg:
    return norm_free_two_view(VICReg)


def scenario_vicreg(rank: int, world: int, out: Path) -> dict:
    model = build_model()
    loss = ddp_loss_backward(model, out / "init.pt", [v[rank * B:(rank + 1) * B] for v in two_view_batch(B, IMAGE)])
    return {"loss": loss, "grads": grads(model)}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp_vicreg", {"vicreg": scenario_vicreg}, {"init.pt": build_model})


def test_vicreg_ddp_matches_single_process(ddp):
    results = ddp("vicreg")
    model, views = build_model(), two_view_batch(B, IMAGE)
    ref_loss, ref, scale = single_process_reference(model, ddp.out / "init.pt", views)
    with torch.no_grad():
        z = [model.projector(f) for f in model.forward_views(views)]
        terms = vicreg_loss(*z)
    assert terms["invariance"] > 0.1 and 0.01 < terms["variance"] < 0.99 and terms["covariance"] > 0.01
    losses = torch.stack([res["loss"] for res in results])
    # invariance is local (per-rank MSE), variance/covariance global: the mean over ranks is the global loss
    torch.testing.assert_close(losses.mean(), ref_loss, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(losses[0], losses[1])
    assert_grads_match(results, ref, scale)
    # guard: variance/covariance on each process's own batch would give a different loss
    with torch.no_grad():
        local = torch.stack([vicreg_loss(z[0][s:s + B], z[1][s:s + B])["loss"] for s in range(0, WORLD * B, B)])
    assert (local.mean() - ref_loss).abs() > 1e-2
