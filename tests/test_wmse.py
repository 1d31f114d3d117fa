"""W-MSE: Cholesky whitening (identity covariance, gradient through Cholesky), the loss against a plain
transcription of htdt/self-supervised's w_mse.py and against lightly, the w_size errors, and 2-process DDP
equivalence."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.wmse import cholesky_whiten, wmse_loss
from ssl_lightning.methods.joint_embedding.wmse import WMSE
from ssl_lightning.registry import SSLError

from ddp_utils import grads, LossStep, spawn_results, WORLD  # tests/ is on sys.path


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 3.0


def test_whitening_gives_identity_covariance():
    x = correlated(128, 16)
    w = cholesky_whiten(x).double()
    w = w - w.mean(0)
    cov = w.T @ w / (len(w) - 1)
    torch.testing.assert_close(cov, torch.eye(16, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(w.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-5, rtol=0)


# ---- htdt/self-supervised's formula, written plainly (float64) -------------------------------------------
def plain_whiten(x: np.ndarray) -> np.ndarray:
    """Whitening2d (eps 0): xn = x - mean; C = xn^T xn / (n - 1); L = chol(C); W = L^-1; W xn."""
    xn = x - x.mean(axis=0)
    L = np.linalg.cholesky(xn.T @ xn / (len(x) - 1))
    return xn @ np.linalg.inv(L).T


def plain_wmse(views: list[np.ndarray], perms: list[np.ndarray], w_size: int) -> float:
    """w_mse.py forward: per iteration, whiten each view's sub-batch, then norm_mse over every pair of views."""
    n, loss, pairs = len(views[0]), 0.0, 0
    for perm in perms:
        z = [np.empty_like(v) for v in views]
        for idx in perm.reshape(-1, w_size):
            for i, v in enumerate(views):
                z[i][idx] = plain_whiten(v[idx])
        for i in range(len(views) - 1):
            for j in range(i + 1, len(views)):
                a = z[i] / np.linalg.norm(z[i], axis=1, keepdims=True)
                b = z[j] / np.linalg.norm(z[j], axis=1, keepdims=True)
                loss += 2 - 2 * (a * b).sum(axis=1).mean()
                pairs += 1
    return loss / pairs  # pairs = w_iter * V (V - 1) / 2


@pytest.mark.parametrize("n_views,w_iter", [(2, 1), (4, 2)])
def test_loss_matches_plain_transcription(n_views, w_iter):
    n, d, w_size = 48, 6, 16
    views = [correlated(n, d, seed=s) + 0.5 * torch.randn(n, d) for s in range(n_views)]
    torch.manual_seed(7)
    got = wmse_loss(views, w_size=w_size, w_iter=w_iter)
    torch.manual_seed(7)
    perms = [torch.randperm(n).numpy() for _ in range(w_iter)]
    want = plain_wmse([v.double().numpy() for v in views], perms, w_size)
    assert abs(float(got) - want) < 1e-5


def test_loss_matches_lightly_and_backpropagates_through_cholesky():
    """lightly.loss.WMSELoss (taken from the same code) whitens each view's sub-batch the same way and gives
    the same value. Differences: it takes the views concatenated in one (V*N, d) tensor, requires
    w_size >= 2 * embedding_dim (we require only w_size > dim, the rank condition), tracks running
    statistics it never uses in training, and has no cross-process gathering. Both default to eps = 0 (no
    shrinkage of the covariance towards I; htdt's ``w_eps``); an earlier htdt train.py whitened the
    concatenated views instead of each view."""
    from lightly.loss import WMSELoss

    n, d, w_size, V = 64, 8, 32, 3
    views = [(correlated(n, d, seed=s) + 0.5 * torch.randn(n, d)).requires_grad_() for s in range(V)]
    torch.manual_seed(3)
    ours = wmse_loss(views, w_size=w_size, w_iter=2)
    torch.manual_seed(3)
    theirs = WMSELoss(embedding_dim=d, w_size=w_size, w_iter=2, num_samples=V)(torch.cat(views))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours.backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0 for v in views)


def test_w_size_errors_name_the_numbers_and_the_fix():
    z = [torch.randn(64, 16), torch.randn(64, 16)]
    with pytest.raises(SSLError, match=r"w_size=16 .*dimension 16.*more than 16"):
        wmse_loss(z, w_size=16)
    with pytest.raises(SSLError, match=r"batch \(64\).*w_size=40.*not a multiple"):
        wmse_loss(z, w_size=40)
    model = WMSE(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0, emb=8,
                 proj_hidden=16, w_size=16)
    views = [torch.randn(24, 1, 16, 16) for _ in range(2)]
    with pytest.raises(SSLError, match="multiple of w_size"):
        model.loss(model.forward_views(views), views, None)


# ---- 2-process DDP: same loss and gradients as one process on the global batch ------------------------------
B, IMAGE, EMB, W_SIZE = 8, 16, 4, 8  # per process 8: global batch 16 = 2 sub-batches of 8, which straddle ranks


def build_wmse() -> WMSE:
    torch.manual_seed(0)
    model = WMSE(backbone="convnet", backbone_kwargs={"norm": "none", "width": 8}, in_channels=1, num_classes=0,
                 emb=EMB, proj_hidden=16, w_size=W_SIZE, w_iter=2)
    model.projector = mlp([model.backbone.num_features, 16, EMB], norm="none")  # the default projector has BN
    return model.double()  # whitening 8 samples is ill-conditioned: float64 keeps summation-order noise out


def global_views(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(WORLD * B, 1, IMAGE, IMAGE, generator=g, dtype=torch.float64) for _ in range(2)]


def scenario_wmse(rank: int, world: int, out: Path) -> dict:
    model = build_wmse()
    model.load_state_dict(torch.load(out / "wmse_init.pt", weights_only=True))
    views = [v[rank * B:(rank + 1) * B] for v in global_views()]
    ddp = nn.parallel.DistributedDataParallel(LossStep(model))
    torch.manual_seed(11 + rank)  # different RNG on each rank: the permutation must come from rank 0
    if rank == 0:
        torch.manual_seed(11)
    loss = ddp(views)
    loss.backward()
    return {"loss": loss.detach(), "grads": grads(model)}


SCENARIOS = {"wmse": scenario_wmse}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp_wmse", SCENARIOS, {"wmse_init.pt": build_wmse})


def test_ddp_matches_single_process_on_global_batch(ddp):
    results = ddp("wmse")
    model = build_wmse()
    model.load_state_dict(torch.load(ddp.out / "wmse_init.pt", weights_only=True))
    views = global_views()
    torch.manual_seed(11)
    loss = model.loss(model.forward_views(views), views, None)
    loss.backward()
    ref = grads(model)
    assert max(g.abs().max() for g in ref.values()) > 1e-6  # 1000 x the gradient tolerance
    for r, res in enumerate(results):
        torch.testing.assert_close(res["loss"], loss.detach(), atol=1e-10, rtol=0)  # every rank: the global loss
        assert res["grads"].keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(res["grads"][name], g, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"rank {r} {n}: {m}")
