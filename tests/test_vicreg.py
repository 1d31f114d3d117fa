"""VICReg: loss against the official main_vicreg.py formula and lightly, terms, errors, and 2-process
DDP (same loss and gradients as one process on the global batch)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.heads import mlp
from ssl_lightning.losses.vicreg import covariance_loss, invariance_loss, variance_loss, vicreg_loss
from ssl_lightning.methods.vicreg import VICReg
from ssl_lightning.registry import SSLError

from ddp_utils import ddp_loss_backward, grads, LossStep, results_getter, run_ddp, WORLD  # tests/ is on sys.path


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
    torch.manual_seed(0)
    model = VICReg(backbone="convnet", backbone_kwargs={"norm": "none", "width": 8}, in_channels=1,
                   num_classes=0, proj_hidden=32, proj_out=16)
    model.projector = mlp([model.backbone.num_features, 32, 16], norm="none")  # no BatchNorm on CPU DDP
    with torch.no_grad():  # the norm-free net's outputs are ~1e-3: scale them to std ~1 so every term is active
        model.projector[-1].weight.mul_(800)
    return model


def global_batch() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * B, 1, IMAGE, IMAGE, generator=g) for _ in range(2)]


def scenario_vicreg(rank: int, world: int, out: Path) -> dict:
    model = build_model()
    loss = ddp_loss_backward(model, out / "init.pt", [v[rank * B:(rank + 1) * B] for v in global_batch()])
    return {"loss": loss, "grads": grads(model)}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_vicreg")
    torch.save(build_model().state_dict(), out / "init.pt")
    return results_getter(run_ddp({"vicreg": scenario_vicreg}, out), out)


def test_vicreg_ddp_matches_single_process(ddp):
    results = ddp("vicreg")
    model = build_model()
    model.load_state_dict(torch.load(ddp.out / "init.pt", weights_only=True))
    views = global_batch()
    ref_loss = LossStep(model)(views)
    ref_loss.backward()
    ref = grads(model)
    assert len(ref) == len(list(model.parameters()))
    # tolerance relative to the gradients' scale: a 1/world_size scaling would be off by 50%
    scale = float(max(g.abs().max() for g in ref.values()))
    assert scale > 1e-3
    with torch.no_grad():
        z = [model.projector(f) for f in model.forward_views(views)]
        terms = vicreg_loss(*z)
    assert terms["invariance"] > 0.1 and 0.01 < terms["variance"] < 0.99 and terms["covariance"] > 0.01
    losses = torch.stack([res["loss"] for res in results])
    # invariance is local (per-rank MSE), variance/covariance global: the mean over ranks is the global loss
    torch.testing.assert_close(losses.mean(), ref_loss.detach(), atol=1e-5, rtol=1e-6)
    assert not torch.allclose(losses[0], losses[1])
    for r, res in enumerate(results):
        assert res["grads"].keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(res["grads"][name], g, atol=1e-5 * scale, rtol=1e-4, msg=lambda m, n=name: f"rank {r} {n}: {m}")
    # guard: variance/covariance on each process's own batch would give a different loss
    with torch.no_grad():
        local = torch.stack([vicreg_loss(z[0][s:s + B], z[1][s:s + B])["loss"] for s in range(0, WORLD * B, B)])
    assert (local.mean() - ref_loss).abs() > 1e-2
