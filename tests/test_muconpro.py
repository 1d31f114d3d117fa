"""MuConPro / GenPro / DiscPro: the three losses against double-loop transcriptions of the poster's
formula, the exact T = 0 / T = inf limits, BYOL's gradient at T = inf, the method (momentum-free view,
small crops, memory bank), 2-process DDP against one process on the global batch, and exact resume."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning import SSLDataModule
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.muconpro import kde_terms, muconpro_loss, parse_temperature, soft_mean
from ssl_lightning.losses.joint_embedding.regression import byol_loss
from ssl_lightning.methods.joint_embedding.muconpro import DiscPro, GenPro, MuConPro
from ssl_lightning.modules import momentum_copy
from ssl_lightning.registry import SSLError

from ddp_utils import ddp_loss_backward, grads, spawn_results, WORLD  # tests/ is on sys.path
from resume_utils import check_resume_is_exact

INF = float("inf")
OBJECTIVES = ("genpro", "discpro", "muconpro")
REPO = Path(__file__).resolve().parents[1]


# ---- plain transcription of the poster's formula (python floats, explicit loops) ----------------------
def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _log_kde(scores: list[float], T: float) -> float:
    """T log 1/n sum_k exp(s_k / T); the limits T = 0 (max) and T = inf (mean) as the sheet states them."""
    if T == INF:
        return sum(scores) / len(scores)
    if T == 0:
        return max(scores)
    return T * math.log(sum(math.exp(s / T) for s in scores) / len(scores))


def plain_loss(z: torch.Tensor, t: torch.Tensor, T: float, objective: str, negatives=None) -> float:
    """z (A, B, D) anchors, t (M, B, D) targets; anchor views a >= M have no target of their own.
    For every anchor (b, i):
        l_gen  = -T log 1/(M-1) sum_{j != i} exp(z_bi . x_bj / T)
        l_disc = -T log 1/(M-1) sum_{j != i} exp(z_bi . x_bj / T) + T log 1/(BM-1) sum_{(c,j) != (b,i)} exp(z_bi . x_cj / T)
        l_muconpro = l_gen + l_disc
    then the mean over all anchors."""
    A, B, _ = z.shape
    M = t.shape[0]
    zs = [[_unit(z[i, b].tolist()) for b in range(B)] for i in range(A)]
    xs = [[_unit(t[j, b].tolist()) for b in range(B)] for j in range(M)]
    neg = [] if negatives is None else negatives.tolist()
    total = 0.0
    for b in range(B):
        for i in range(A):
            same = [_dot(zs[i][b], xs[j][b]) for j in range(M) if j != i]
            cross = [_dot(zs[i][b], xs[j][c]) for c in range(B) for j in range(M) if (c, j) != (b, i)]
            cross += [_dot(zs[i][b], n) for n in neg]
            gen = -_log_kde(same, T)
            disc = -_log_kde(same, T) + _log_kde(cross, T)
            total += {"genpro": gen, "discpro": disc, "muconpro": gen + disc}[objective]
    return total / (A * B)


def random_zt(A=5, M=4, B=3, D=6, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(A, B, D, generator=g), torch.randn(M, B, D, generator=g)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("T", [0.0, 0.3, 1.0, INF])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "small_crop+bank"])
def test_losses_match_double_loop_transcription(objective, T, extras):
    z, t = random_zt(A=5 if extras else 4, M=4)  # with extras: view 4 is an anchor-only small crop
    negatives = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(9)), dim=1) if extras else None
    ours = muconpro_loss(z.double(), t.double(), T, objective, negatives.double() if extras else None)
    assert ours.item() == pytest.approx(plain_loss(z.double(), t.double(), T, objective, negatives), abs=1e-10)
    # float32 too, as training runs it
    assert muconpro_loss(z, t, T, objective, negatives).item() == pytest.approx(ours.item(), abs=1e-5)


def test_muconpro_is_gen_plus_disc_and_terms_differ():
    z, t = random_zt()
    gen, disc = kde_terms(z, t, 1.0)
    assert gen.shape == disc.shape == (5, 3)
    torch.testing.assert_close(muconpro_loss(z, t, 1.0, "muconpro"), (gen + disc).mean())
    assert not torch.allclose(gen.mean(), disc.mean())


def test_soft_mean_exact_limits_and_convergence():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 7, generator=g) * 2 - 1
    mask = torch.rand(3, 7, generator=g) > 0.3
    mask[:, 0] = True
    # exact branches: no huge / tiny numbers plugged in
    assert torch.equal(soft_mean(s, INF, mask), torch.stack([s[r][mask[r]].mean() for r in range(3)]))
    assert torch.equal(soft_mean(s, 0.0, mask), torch.stack([s[r][mask[r]].max() for r in range(3)]))
    direct = torch.stack([0.5 * torch.log(torch.exp(s[r][mask[r]] / 0.5).mean()) for r in range(3)])
    torch.testing.assert_close(soft_mean(s, 0.5, mask), direct)
    # T -> inf approaches the mean, T -> 0 the max, monotonically
    to_mean = [(soft_mean(s, T, mask) - soft_mean(s, INF, mask)).abs().max() for T in (1.0, 10.0, 100.0, 1e4)]
    to_max = [(soft_mean(s, T, mask) - soft_mean(s, 0.0, mask)).abs().max() for T in (1.0, 0.1, 0.01, 1e-3)]
    assert all(a > b for a, b in zip(to_mean, to_mean[1:])) and to_mean[-1] < 1e-4
    assert all(a > b for a, b in zip(to_max, to_max[1:])) and to_max[-1] < 1e-2


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_large_and_small_temperatures_approach_the_limits(objective):
    z, t = random_zt(seed=3)
    negatives = None if objective == "genpro" else F.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(7)), dim=1)

    def value_and_grad(T):
        zz = z.double().requires_grad_()
        loss = muconpro_loss(zz, t.double(), T, objective, negatives)
        loss.backward()
        return loss.detach(), zz.grad

    at_inf, at_zero = value_and_grad(INF), value_and_grad(0.0)
    big, small = value_and_grad(1e5), value_and_grad(1e-4)
    assert (big[0] - at_inf[0]).abs() < 1e-4 and (big[1] - at_inf[1]).abs().max() < 1e-4
    assert (small[0] - at_zero[0]).abs() < 1e-3  # the gap is at most T log(n)
    torch.testing.assert_close(small[1], at_zero[1], atol=1e-6, rtol=0)  # away from ties the argmax is stable
    # and the finite-T values differ from each other (the limits are not the same loss)
    assert (at_inf[0] - at_zero[0]).abs() > 1e-3


def test_genpro_gradient_at_infinite_temperature_is_byols():
    """At T = inf, l_gen = -1/(M-1) sum_{j != i} z_bi . x_bj: its gradient w.r.t. the normalised anchor is
    -1/(M-1) sum_{j != i} x_bj (per anchor, / (M B) for the mean) -- BYOL's regression gradient."""
    M, B = 4, 3
    z, t = random_zt(A=M, M=M, B=B, seed=5)
    z1 = z.clone().requires_grad_()
    loss = muconpro_loss(z1, t, INF, "genpro")
    loss.backward()
    # explicit: through the normalisation z -> u = z / |z|, d/dz = (I - u u^T) / |z| applied to d/du
    u, x = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    d_u = torch.stack([-(x.sum(0) - x[i]) / (M - 1) for i in range(M)]) / (M * B)
    expected = (d_u - (d_u * u).sum(-1, keepdim=True) * u) / z.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(z1.grad, expected, atol=1e-6, rtol=1e-5)
    # the repo's BYOL loss, 2 - 2 cos, averaged over the ordered view pairs, is 2 (l_gen + 1)
    z2 = z.clone().requires_grad_()
    byol = sum(byol_loss(z2[i], t[j]) for i in range(M) for j in range(M) if j != i) / (M * (M - 1))
    (byol / 2).backward()
    torch.testing.assert_close(z2.grad, z1.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, byol.detach() / 2 - 1)


def test_temperature_parsing_and_errors():
    assert parse_temperature("inf") == INF and parse_temperature(float("inf")) == INF
    assert parse_temperature(0) == 0.0 and parse_temperature("0.5") == 0.5
    for bad in (-1.0, "abc", float("nan"), None):
        with pytest.raises(SSLError, match="temperature"):
            parse_temperature(bad)
    with pytest.raises(SSLError, match="objective"):
        muconpro_loss(*random_zt(), 1.0, "byol")
    with pytest.raises(SSLError, match=">= 2 target views"):
        muconpro_loss(*random_zt(A=1, M=1), 1.0)


@pytest.mark.parametrize("value,expected", [("inf", INF), (".inf", INF), ("0", 0.0)])
def test_config_temperature_from_the_command_line(value, expected, monkeypatch, tmp_path):
    from ssl_lightning.cli import SSLCLI

    monkeypatch.setattr(sys, "argv", ["ssl-lightning"])
    cli = SSLCLI(run=False, args=["--config", str(REPO / "experiments/fashion_mnist/muconpro.yaml"),
                                  "--run_dir", str(tmp_path), "--trainer.logger", "false",
                                  "--model.init_args.temperature", value, "--model.init_args.objective", "discpro"])
    assert isinstance(cli.model, MuConPro) and cli.model.temperature == expected
    assert cli.model.hparams.objective == "discpro" and cli.model.hparams.temperature == expected


# ---- the method -------------------------------------------------------------------------------------------
TINY = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0, proj_hidden=32,
            proj_out=16, pred_hidden=32)


def views_of(B: int, n_large: int = 3, n_small: int = 1, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 1, 16, 16, generator=g) for _ in range(n_large)] + \
           [torch.randn(B, 1, 8, 8, generator=g) for _ in range(n_small)]


def test_method_loss_is_the_formula_on_its_heads():
    """2 momentum views + 1 momentum-free large view + 1 small crop: anchors are the predictor outputs
    of all 4 views; targets the EMA network's projections of views 0-1 and the online projection of
    view 2 (stop-gradient); the small crop is an anchor only."""
    torch.manual_seed(0)
    model = MuConPro(objective="muconpro", temperature=0.5, num_views=2, momentum_free_views=1, **TINY)
    with torch.no_grad():  # a teacher different from the student, so the two target sources differ
        for p in model.teacher_backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    views = views_of(6)
    out = model.loss(model.forward_views(views), views, torch.arange(6))
    out["loss"].backward()
    got = grads(model)
    model.zero_grad()

    proj = [model.projector(model.backbone(v)) for v in views]
    z = torch.stack([model.predictor(p) for p in proj])
    t = torch.stack([model.teacher_projector(model.teacher_backbone(v)) for v in views[:2]] + [proj[2].detach()])
    gen, disc = kde_terms(z, t, 0.5)
    ref = (gen + disc).mean()
    ref.backward()
    torch.testing.assert_close(out["loss"], ref.detach())
    torch.testing.assert_close(out["gen"], gen.mean().detach())
    torch.testing.assert_close(out["disc"], disc.mean().detach())
    assert got.keys() == grads(model).keys() and not any("teacher" in n for n in got)
    for n, g in grads(model).items():
        torch.testing.assert_close(got[n], g, msg=n)
    # the momentum-free target is the online projection: not the teacher's (which would change the loss)
    t_teacher = torch.stack([model.teacher_projector(model.teacher_backbone(v)) for v in views[:3]])
    assert not torch.allclose(muconpro_loss(z, t_teacher, 0.5), ref)


def test_objective_aliases_and_errors():
    assert GenPro(**TINY).hparams.objective == "genpro" and DiscPro(**TINY).hparams.objective == "discpro"
    assert MuConPro(temperature="inf", **TINY).temperature == INF
    with pytest.raises(SSLError, match="objective"):
        MuConPro(objective="simclr", **TINY)
    with pytest.raises(SSLError, match="GenPro does not use"):
        MuConPro(objective="genpro", memory_bank_size=64, **TINY)
    with pytest.raises(SSLError, match="temperature"):
        MuConPro(temperature=-1, **TINY)
    model = MuConPro(num_views=4, **TINY)
    views = views_of(4, n_large=3, n_small=0)
    with pytest.raises(SSLError, match="got 3 views per image but needs num_views \\+ momentum_free_views = 4"):
        model.loss(model.forward_views(views), views, torch.arange(4))
    small_bank = MuConPro(num_views=3, memory_bank_size=8, **TINY)
    with pytest.raises(SSLError, match="memory_bank_size=8 is smaller .* at least 12"):
        small_bank.loss(small_bank.forward_views(views), views, torch.arange(4))


def test_memory_bank_negatives_then_enqueue():
    torch.manual_seed(0)
    model = MuConPro(objective="discpro", temperature=1.0, num_views=3, memory_bank_size=24, **TINY).eval()
    batches = [views_of(4, n_large=3, n_small=0, seed=s) for s in (1, 2, 3)]

    def targets(views):
        return torch.stack([model.teacher_projector(model.teacher_backbone(v)) for v in views])

    with torch.no_grad():
        losses = []
        for k, views in enumerate(batches):
            bank_before = model.queue.bank[: int(model.queue.filled)].clone()
            assert bank_before.shape[0] == 12 * k  # only filled rows are used: no zero or random negatives
            losses.append(model.loss(model.forward_views(views), views, None)["loss"])
            z = torch.stack([model.predictor(model.projector(model.backbone(v))) for v in views])
            t = targets(views)
            torch.testing.assert_close(losses[-1], muconpro_loss(z, t, 1.0, "discpro", bank_before))
            if k:
                assert not torch.allclose(losses[-1], muconpro_loss(z, t, 1.0, "discpro"))  # the bank mattered
        # the newest 12 rows: the last batch's normalised targets, image-major (image 0's 3 views first)
        expected = F.normalize(targets(batches[2]).transpose(0, 1).reshape(12, 16), dim=1)
        torch.testing.assert_close(model.queue.bank[:12], expected)  # ring of 24: step 3 wrapped to the start
        assert int(model.queue.filled) == 24 and int(model.queue.ptr) == 12


# ---- 2-process DDP: the cross-image set is the global batch ------------------------------------------------
B = 3  # images per process


def ddp_inputs():
    z, t = random_zt(A=4, M=3, B=WORLD * B, seed=11)
    return z, t, F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(12)), dim=1)


LOSS_CASES = [(o, T) for o in OBJECTIVES for T in (0.0, 0.5, INF)]


def build_ddp_muconpro() -> MuConPro:
    torch.manual_seed(0)
    model = MuConPro(objective="muconpro", temperature=0.5, num_views=2, momentum_free_views=1,
                     memory_bank_size=40, **(TINY | {"backbone_kwargs": {"width": 8, "norm": "none"}}))
    model.projector = mlp([model.backbone.num_features, 32, 16], norm="none")  # no BN: 2 x B == 1 x 2B
    model.predictor = mlp([16, 32, 16], norm="none")
    model.teacher_backbone = momentum_copy(model.backbone)
    model.teacher_projector = momentum_copy(model.projector)
    with torch.no_grad():
        for p in model.teacher_backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.queue.enqueue(F.normalize(torch.randn(9, 16), dim=1))  # partly filled, the same on every rank
    return model


def scenario_loss(rank: int, world: int, out: Path) -> dict:
    z, t, negatives = ddp_inputs()
    sl = slice(rank * B, (rank + 1) * B)
    res = {}
    for objective, T in LOSS_CASES:
        zz = z[:, sl].clone().requires_grad_()
        loss = muconpro_loss(zz, t[:, sl], T, objective, negatives)
        loss.backward()
        res[(objective, T)] = (loss.detach(), zz.grad)
    return res


def scenario_method(rank: int, world: int, out: Path) -> dict:
    model = build_ddp_muconpro()
    views = [v[rank * B:(rank + 1) * B] for v in views_of(WORLD * B, n_large=3, n_small=1, seed=4)]
    loss = ddp_loss_backward(model, out / "muconpro_init.pt", views)
    return {"loss": loss, "grads": grads(model),
            "queue": {k: v.clone() for k, v in model.queue.state_dict().items()}}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp_muconpro", {"loss": scenario_loss, "method": scenario_method},
                         {"muconpro_init.pt": build_ddp_muconpro})


def test_ddp_loss_and_gradient_equal_one_process_on_global_batch(ddp):
    results = ddp("loss")
    z, t, negatives = ddp_inputs()
    for objective, T in LOSS_CASES:
        zz = z.clone().requires_grad_()
        ref = muconpro_loss(zz, t, T, objective, negatives)
        ref.backward()
        losses = torch.stack([r[(objective, T)][0] for r in results])
        torch.testing.assert_close(losses.mean(), ref.detach(), atol=1e-6, rtol=0)
        # each rank averages over its own anchors; DDP's mean over ranks gives the global-batch gradient
        grad = torch.cat([r[(objective, T)][1] for r in results], dim=1) / WORLD
        torch.testing.assert_close(grad, zz.grad, atol=1e-7, rtol=1e-5, msg=lambda m: f"{objective} T={T}: {m}")


def test_ddp_guard_local_negatives_would_differ():
    z, t, _ = ddp_inputs()
    full = muconpro_loss(z, t, 0.5, "discpro")
    local = torch.stack([muconpro_loss(z[:, r * B:(r + 1) * B], t[:, r * B:(r + 1) * B], 0.5, "discpro")
                         for r in range(WORLD)]).mean()
    assert (full - local).abs() > 1e-2


def test_ddp_method_equals_one_process(ddp):
    results = ddp("method")
    model = build_ddp_muconpro()
    model.load_state_dict(torch.load(ddp.out / "muconpro_init.pt", weights_only=True))
    views = views_of(WORLD * B, n_large=3, n_small=1, seed=4)
    out = model.loss(model.forward_views(views), views, None)
    out["loss"].backward()
    ref = grads(model)
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), out["loss"].detach(), atol=1e-6, rtol=0)
    assert max(g.abs().max() for g in ref.values()) > 1e-4
    for r, res in enumerate(results):
        assert res["grads"].keys() == ref.keys()
        for n, g in ref.items():
            torch.testing.assert_close(res["grads"][n], g, atol=1e-7, rtol=1e-5, msg=lambda m, n=n: f"rank {r} {n}: {m}")
        for k, v in model.queue.state_dict().items():  # the global batch's targets, in the same order
            torch.testing.assert_close(res["queue"][k], v, atol=1e-6, rtol=0, msg=k)
    assert int(model.queue.filled) == 9 + 3 * WORLD * B


# ---- exact resume (teacher, memory bank, optimizer) ---------------------------------------------------------
def _resume_model() -> MuConPro:
    L.seed_everything(0)
    return MuConPro(**(TINY | {"num_classes": 10}), num_views=3, memory_bank_size=48, momentum_base=0.9,
                    optimizer="lars", lr=0.5, warmup_epochs=1)


def _resume_data() -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         views=[ViewConfig(count=3, scale=(0.3, 1.0))],
                         dataset_options={"size": 32, "image_size": 16, "channels": 1})


def _perturb(model: MuConPro) -> None:  # restored state must not depend on the fresh model's
    model.queue.bank.normal_()
    nn.init.normal_(model.teacher_projector[0].weight)


def test_resume_matches_uninterrupted(tmp_path):
    runs = check_resume_is_exact(_resume_model, _resume_data, tmp_path, perturb=_perturb)
    assert {"train/gen", "train/disc"} <= set(runs.t_straight.callback_metrics)
    assert runs.t_resumed.global_step == runs.t_straight.global_step == 8
    sd_a = runs.straight.state_dict()
    assert "queue.bank" in sd_a and "teacher_backbone.features.0.weight" in sd_a
    assert int(sd_a["queue.filled"]) == 48
