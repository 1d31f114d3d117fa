"""Deep InfoMax: the three estimators against loop transcriptions of their formulas, the sheet's invariants, the
local objective's positives / negatives layout against loops and against a transcription of the official
``dim_losses.py``, the prior term's gradient routing, a Lightning fit, exact resume and the errors. The 2-process
check (negatives gathered across processes) is in test_ddp.py (shared spawn)."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning import SSLDataModule
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.losses import dim_loss, dim_scores, dv_mi_loss, infonce_mi_loss, jsd_mi_loss
from ssl_lightning.methods import METHODS, DeepInfoMax
from ssl_lightning.methods.mutual_information.mi_networks import MI1x1ConvNet
from ssl_lightning.registry import SSLError

from resume_utils import check_resume_is_exact  # tests/ is on sys.path

TINY = dict(backbone="convnet", backbone_kwargs={"width": 4}, in_channels=1, num_classes=0, mi_units=16,
            encoding_dim=8, encoding_hidden=16)


def softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


# ---- estimators: loop transcriptions ----------------------------------------------------------------------------------
def test_jsd_matches_loop_transcription():
    torch.manual_seed(0)
    pos, neg = torch.randn(5) * 3, torch.randn(7, 3) * 3
    e_pos = sum(math.log(2) - softplus(-float(t)) for t in pos) / 5
    e_neg = sum(softplus(-float(t)) + float(t) - math.log(2) for t in neg.flatten()) / 21  # official sp(-T) + T - log 2
    assert jsd_mi_loss(pos, neg).item() == pytest.approx(e_neg - e_pos, rel=1e-6)


def test_dv_matches_loop_transcription_and_is_stable():
    torch.manual_seed(1)
    pos, neg = torch.randn(4, 2), torch.randn(6, 5)
    want = math.log(sum(math.exp(float(t)) for t in neg.flatten()) / 30) - float(pos.mean())
    assert dv_mi_loss(pos, neg).item() == pytest.approx(want, rel=1e-6)
    big = dv_mi_loss(pos.double() + 1000, neg.double() + 1000)  # exp(1000) overflows; the shifted form does not
    assert torch.isfinite(big) and big.item() == pytest.approx(want, rel=1e-6)


def test_infonce_matches_loop_transcription():
    torch.manual_seed(2)
    pos, neg = torch.randn(4), torch.randn(4, 6)
    total = 0.0
    for a in range(4):
        denom = math.exp(float(pos[a])) + sum(math.exp(float(t)) for t in neg[a])
        total += -math.log(math.exp(float(pos[a])) / denom)
    assert infonce_mi_loss(pos, neg).item() == pytest.approx(total / 4, rel=1e-6)


# ---- the sheet's invariants ---------------------------------------------------------------------------------------------
def test_jsd_is_zero_at_zero_scores_and_dv_for_any_constant():
    zeros = torch.zeros(3), torch.zeros(3, 4)
    assert jsd_mi_loss(*zeros).item() == pytest.approx(0.0, abs=1e-7)  # JSD: 0 at T = 0 (the sheet's form)
    for c in (-5.0, 0.0, 2.5, 50.0):
        pos, neg = torch.full((3,), c), torch.full((3, 4), c)
        assert dv_mi_loss(pos, neg).item() == pytest.approx(0.0, abs=1e-5)
        if c != 0:  # other constants: the JSD bound is below 0 (loss 2 sp(-c) + c - 2 log 2 > 0)
            assert jsd_mi_loss(pos, neg).item() == pytest.approx(2 * softplus(-c) + c - 2 * math.log(2), rel=1e-5)
            assert jsd_mi_loss(pos, neg).item() > 0


@pytest.mark.parametrize("k", [1, 7, 100])
def test_infonce_with_k_equal_score_negatives_is_ln_k_plus_1(k):
    assert infonce_mi_loss(torch.full((5,), 0.3), torch.full((5, k), 0.3)).item() == pytest.approx(math.log(k + 1), rel=1e-6)


# ---- the local objective's layout --------------------------------------------------------------------------------------
def _official(l: torch.Tensor, m: torch.Tensor, mode: str) -> torch.Tensor:
    """rdevon/DIM functions/dim_losses.py transcribed (fenchel_dual_loss with JSD, infonce_loss);
    l (N, units, n_locals), m (N, units, n_multis)."""
    N, units, n_locals = l.size()
    n_multis = m.size(2)
    if mode == "infonce":
        l_p, m_p = l.permute(0, 2, 1), m.permute(0, 2, 1)
        l_n, m_n = l_p.reshape(-1, units), m_p.reshape(-1, units)
        u_p = torch.matmul(l_p, m).unsqueeze(2)
        u_n = torch.mm(m_n, l_n.t()).reshape(N, n_multis, N, n_locals).permute(0, 2, 3, 1)
        mask = torch.eye(N)[:, :, None, None]
        n_mask = 1 - mask
        u_n = (n_mask * u_n) - (10. * (1 - n_mask))
        u_n = u_n.reshape(N, N * n_locals, n_multis).unsqueeze(dim=1).expand(-1, n_locals, -1, -1)
        pred_log = F.log_softmax(torch.cat([u_p, u_n], dim=2), dim=2)
        return -pred_log[:, :, 0].mean()
    l2, m2 = l.permute(0, 2, 1).reshape(-1, units), m.permute(0, 2, 1).reshape(-1, units)
    u = torch.mm(m2, l2.t()).reshape(N, n_multis, N, n_locals).permute(0, 2, 3, 1)
    mask = torch.eye(N)
    n_mask = 1 - mask
    if mode == "jsd":
        e_pos = (math.log(2.) - F.softplus(-u)).mean(2).mean(2)
        e_neg = (F.softplus(-u) + u - math.log(2.)).mean(2).mean(2)
        return (e_neg * n_mask).sum() / n_mask.sum() - (e_pos * mask).sum() / mask.sum()
    # donsker_varadhan_loss is not transcribed: its (N, N) masks broadcast wrongly against the (N, N, P, 1) scores
    # (E_pos sums over every pair; the in-place -10 shift raises for any N > 1): the loops check what it means to do
    raise ValueError(mode)


def test_scores_layout_matches_loops():
    torch.manual_seed(3)
    local, glob = torch.randn(5, 3, 2, 2), torch.randn(2, 3)
    scores, mask = dim_scores(local, glob, offset=2)  # globals of images 2 and 3 against all 5 local maps
    assert scores.shape == (2, 5, 4) and mask.tolist() == [[False, False, True, False, False],
                                                           [False, False, False, True, False]]
    for i in range(2):
        for j in range(5):
            for p in range(4):
                want = sum(float(glob[i, d] * local[j, d, p // 2, p % 2]) for d in range(3))
                assert scores[i, j, p].item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("estimator", ["jsd", "dv", "infonce"])
def test_local_objective_matches_loops_and_the_official_code(estimator):
    torch.manual_seed(4)
    n, d, h, w = 4, 6, 3, 2
    local, glob = torch.randn(n, d, h, w), torch.randn(n, d)
    got = dim_loss(local, glob, estimator)
    T = [[[sum(float(glob[i, c] * local[j, c, p // w, p % w]) for c in range(d)) for p in range(h * w)]
          for j in range(n)] for i in range(n)]
    pos = [T[i][i][p] for i in range(n) for p in range(h * w)]  # image i's global vs its own positions
    neg = [T[i][j][p] for i in range(n) for j in range(n) if j != i for p in range(h * w)]  # other images' positions
    if estimator == "jsd":
        want = sum(softplus(t) - math.log(2) for t in neg) / len(neg) - sum(math.log(2) - softplus(-t) for t in pos) / len(pos)
    elif estimator == "dv":
        want = math.log(sum(math.exp(t) for t in neg) / len(neg)) - sum(pos) / len(pos)
    else:  # anchor (i, p): positive T[i][i][p]; candidates all (j, p') with j != i, and the own positions at -10
        want = 0.0
        for i in range(n):
            others = [T[i][j][q] if j != i else -10.0 for j in range(n) for q in range(h * w)]
            for p in range(h * w):
                want -= T[i][i][p] - math.log(math.exp(T[i][i][p]) + sum(math.exp(t) for t in others))
        want /= n * h * w
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    if estimator != "dv":
        official = _official(local.flatten(2).double(), glob[:, :, None].double(), estimator)
        assert got.item() == pytest.approx(official.item(), rel=1e-5, abs=1e-6)


def test_global_objective_is_the_one_position_case():
    torch.manual_seed(5)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    assert dim_loss(a[:, :, None], b, "dv").item() == pytest.approx(
        math.log(sum(math.exp(float(b[i] @ a[j])) for i in range(6) for j in range(6) if i != j) / 30)
        - float((a * b).sum(1).mean()), rel=1e-5)
    for estimator in ("jsd", "infonce"):
        got = dim_loss(a[:, :, None], b, estimator)
        assert got.item() == pytest.approx(_official(a[:, :, None].double(), b[:, :, None].double(), estimator).item(),
                                           rel=1e-5, abs=1e-6)


# ---- the MI networks and the method ---------------------------------------------------------------------------------
def test_mi_network_shortcut_is_a_noisy_identity_and_output_layer_normalised():
    torch.manual_seed(6)
    net = MI1x1ConvNet(3, 8)
    w = net.shortcut.weight[:, :, 0, 0]
    assert torch.equal(w[:3, :3].diagonal(), torch.ones(3))
    off = w.clone()
    off[torch.arange(3), torch.arange(3)] = 0
    assert off.abs().max() <= 0.01 and off.abs().max() > 0
    out = net(torch.randn(4, 3, 5, 5))
    assert out.shape == (4, 8, 5, 5)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(4, 5, 5), atol=1e-5, rtol=0)  # LayerNorm over channels


def test_local_stage_default_and_terms():
    model = DeepInfoMax(**TINY, alpha=0.5, gamma=0.1)
    assert model.local.name == "block3" and DeepInfoMax(**TINY, local_stage="block2").local.name == "block2"
    views = [torch.randn(4, 1, 16, 16)]
    out = model.loss(model.forward_views(views), views, torch.arange(4))
    assert set(out) == {"loss", "local", "global", "prior", "prior_discriminator"}
    want = out["local"] + 0.5 * out["global"] + 0.1 * out["prior"] + out["prior_discriminator"]
    torch.testing.assert_close(out["loss"], want)
    res = DeepInfoMax(backbone="resnet18", backbone_kwargs={"cifar_stem": True}, in_channels=1, num_classes=0,
                      mi_units=16, encoding_dim=8, encoding_hidden=16)
    assert res.local.name == "layer3" and res.local.channels == 256


def test_prior_losses_reach_only_their_own_networks():
    """The discriminator learns only from its loss, the encoder only from the generator loss (and the MI terms)."""
    model = DeepInfoMax(**TINY, gamma=0.1)
    views = [torch.randn(4, 1, 16, 16)]

    def grads(term):
        model.zero_grad()
        torch.manual_seed(7)  # the same prior samples every time
        out = model.loss(model.forward_views(views), views, torch.arange(4))
        (out[term] if term != "encoder" else out["local"] + 0.1 * out["prior"]).backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    total, disc, encoder = grads("loss"), grads("prior_discriminator"), grads("encoder")
    for name in total:
        want = disc[name] if name.startswith("discriminator.") else encoder[name]
        torch.testing.assert_close(total[name], want, msg=name)
    assert all(disc[n].abs().sum() == 0 for n in disc if not n.startswith("discriminator."))
    assert all(encoder[n].abs().sum() == 0 for n in encoder if n.startswith("discriminator."))
    assert disc["discriminator.0.weight"].abs().sum() > 0 and encoder["encoding.0.weight"].abs().sum() > 0


def _data() -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         views=[ViewConfig(count=1, scale=(0.8, 1.0))],
                         dataset_options={"size": 32, "image_size": 16, "channels": 1})


def _model(**kwargs) -> DeepInfoMax:
    L.seed_everything(0)
    return DeepInfoMax(**dict(TINY, num_classes=10), optimizer="adamw", lr=1e-3, weight_decay=0.0, warmup_epochs=0,
                       **kwargs)


def test_lightning_fit_trains_every_network_and_the_discriminator_group(tmp_path):
    model = _model(alpha=0.5, estimator="infonce")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, _data())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for prefix in ("backbone.", "encoding.", "local_net.", "encoding_net.", "map_net.", "global_encoding_net.",
                   "discriminator."):
        assert any(n.startswith(prefix) for n in changed), prefix
    groups = trainer.optimizers[0].param_groups
    disc = next(g for g in groups if g.get("name") == "prior_discriminator")
    assert disc["weight_decay"] == 0 and {id(p) for p in disc["params"]} == {id(p) for p in model.discriminator.parameters()}
    assert all(torch.isfinite(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/"))
    assert {"train/local", "train/global", "train/prior", "train/prior_discriminator"} <= set(trainer.callback_metrics)


def test_resume_is_exact_with_the_prior_discriminator(tmp_path):
    check_resume_is_exact(lambda: _model(gamma=0.1), _data, tmp_path)


# ---- registry and errors ----------------------------------------------------------------------------------------------
def test_registered_and_errors_name_the_fix():
    assert METHODS.get("dim") is DeepInfoMax
    with pytest.raises(SSLError, match="estimator 'nce'.*'dv', 'infonce', 'jsd'"):
        DeepInfoMax(**TINY, estimator="nce")
    with pytest.raises(SSLError, match="Unknown Deep InfoMax estimator"):
        dim_loss(torch.randn(2, 3, 1), torch.randn(2, 3), "mine")
    with pytest.raises(SSLError, match="alpha or beta > 0"):
        DeepInfoMax(**TINY, alpha=0.0, beta=0.0)
    with pytest.raises(SSLError, match="has no stage 'layer3'"):
        DeepInfoMax(**TINY, local_stage="layer3")
    model = DeepInfoMax(**TINY)
    views = [torch.randn(2, 1, 16, 16)] * 2
    with pytest.raises(SSLError, match="one view per image"):
        model.forward_views(views)
    with pytest.raises(SSLError, match="at least 2 images"):
        dim_loss(torch.randn(1, 3, 2), torch.randn(1, 3))


def test_backbone_without_feature_maps_is_an_error(monkeypatch):
    import ssl_lightning.methods.base as base

    monkeypatch.setattr(base, "build_backbone", lambda name, **kw: _Flat())
    with pytest.raises(SSLError, match="_Flat has no feature-map access.*'convnet' or a 'resnet\\*' backbone"):
        DeepInfoMax(backbone="anything", in_channels=1, num_classes=0)


class _Flat(torch.nn.Module):
    num_features = 4

    def forward(self, x):
        return x.flatten(1)[:, :4]
