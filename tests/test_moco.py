"""MoCo v1/v2 and MoCo v3: losses against plain transcriptions (and lightly), the queue, shuffle-BN,
the K % batch error, 2-process DDP against one process, and exact resume."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from torch import nn

from ssl_lightning import SSLDataModule, distributed
from ssl_lightning.heads import mlp
from ssl_lightning.losses.metric.infonce import moco_infonce, mocov3_infonce
from ssl_lightning.methods.joint_embedding.moco import (MoCoV1, MoCoV2, SplitBatchNorm2d, batch_shuffle_ddp, batch_unshuffle_ddp,
                                        split_batch_norm)
from ssl_lightning.methods.joint_embedding.mocov3 import MoCoV3
from ssl_lightning.modules import ema_update, momentum_copy
from ssl_lightning.registry import SSLError

from ddp_utils import ddp_loss_backward, grads, spawn_results, WORLD  # tests/ is on sys.path
from resume_utils import check_resume_is_exact

TINY = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0)
NORM_FREE = dict(TINY, backbone_kwargs={"width": 8, "norm": "none"})


def _views(n: int, seed: int = 0, image: int = 16, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, image, image, generator=g, dtype=dtype) for _ in range(2)]


# ---- losses: plain transcriptions ------------------------------------------------------------------------
def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.pow(2).sum().sqrt()


def moco_reference(q, k, queue, t):
    """He et al. eq. (1), one query at a time: -log exp(q.k+/T) / (exp(q.k+/T) + sum_i exp(q.k_i/T))."""
    total = 0.0
    for i in range(q.shape[0]):
        qi, ki = _unit(q[i]), _unit(k[i])
        pos = torch.exp(qi @ ki / t)
        neg = sum(torch.exp(qi @ queue[j] / t) for j in range(queue.shape[0]))
        total = total - torch.log(pos / (pos + neg))
    return total / q.shape[0]


def mocov3_reference(q, k, t):
    """MoCo v3's ctr(q, k) = 2T * mean_i -log exp(q_i.k_i/T) / sum_j exp(q_i.k_j/T)."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = _unit(q[i])
        den = sum(torch.exp(qi @ _unit(k[j]) / t) for j in range(k.shape[0]))
        total = total - torch.log(torch.exp(qi @ _unit(k[i]) / t) / den)
    return 2 * t * total / q.shape[0]


@pytest.mark.parametrize("n,d,size,t", [(1, 4, 3, 0.07), (4, 8, 16, 0.2), (8, 16, 32, 0.5)])
def test_moco_infonce_matches_plain_formula_and_lightly(n, d, size, t):
    g = torch.Generator().manual_seed(n * d)
    q, k = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    queue = F.normalize(torch.randn(size, d, generator=g), dim=1)
    q32, q64 = q.clone().requires_grad_(), q.double().requires_grad_()
    ours, ref = moco_infonce(q32, k, queue, t), moco_reference(q64, k.double(), queue.double(), t)
    assert abs(ours.item() - ref.item()) < 1e-5
    ours.backward()
    ref.backward()
    torch.testing.assert_close(q32.grad.double(), q64.grad, atol=1e-5, rtol=0)
    # lightly's NTXentLoss with a memory bank is the same loss when its bank holds our queue: positive at
    # logit 0, bank rows as negatives. (Differences: lightly does not detach out1 and enqueues it inside
    # the call; here the key carries no gradient, as in MoCo.)
    theirs_fn = NTXentLoss(temperature=t, memory_bank_size=(size, d))
    theirs_fn.memory_bank.bank = queue.clone()
    q_l = q.clone().requires_grad_()
    theirs = theirs_fn(q_l, k)
    theirs.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(q32.grad, q_l.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,d,t", [(1, 4, 0.2), (5, 8, 0.2), (8, 16, 1.0)])
def test_mocov3_infonce_matches_plain_formula(n, d, t):
    """lightly has no MoCo v3 loss (its NTXentLoss without a bank is SimCLR's 2N-view loss with
    same-view negatives and no 2T factor), so only the plain transcription is compared."""
    g = torch.Generator().manual_seed(n + d)
    q, k = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    q32, q64 = q.clone().requires_grad_(), q.double().requires_grad_()
    ours, ref = mocov3_infonce(q32, k, t), mocov3_reference(q64, k.double(), t)
    assert abs(ours.item() - ref.item()) < 1e-5
    ours.backward()
    ref.backward()
    torch.testing.assert_close(q32.grad.double(), q64.grad, atol=1e-5, rtol=0)
    k_grad = k.clone().requires_grad_()
    mocov3_infonce(q.clone().requires_grad_(), k_grad, t).backward()
    assert k_grad.grad is None, "keys must get no gradient"


# ---- MoCo v1/v2: heads, queue, errors, split BN ---------------------------------------------------------
def test_moco_versions_and_heads():
    v1, v2 = MoCoV1(**TINY, queue_size=16), MoCoV2(**TINY, queue_size=16)
    assert v1.hparams.temperature == 0.07 and v2.hparams.temperature == 0.2
    assert [type(m) for m in v1.head] == [nn.Linear] and v1.head[0].out_features == 128
    assert [type(m) for m in v2.head] == [nn.Linear, nn.ReLU, nn.Linear]  # v2's MLP head has no BN
    assert v2.head[0].out_features == v2.backbone.num_features
    assert v2.hparams.momentum_base == v2.hparams.momentum_final == 0.999  # constant m
    assert not any(p.requires_grad for p in v2.key_backbone.parameters()) and v2.queue.size == 16
    assert sum(isinstance(m, SplitBatchNorm2d) for m in v2.key_backbone.modules()) == 4
    assert not any(isinstance(m, SplitBatchNorm2d) for m in v2.backbone.modules())
    ema_update(v2.key_backbone, v2.backbone, 0.5)  # same parameter lists after the BN swap
    off = MoCoV2(**TINY, queue_size=16, shuffle_bn=False)
    assert not any(isinstance(m, SplitBatchNorm2d) for m in off.key_backbone.modules())


def test_moco_loss_then_enqueue_gathered_keys():
    torch.manual_seed(0)
    model = MoCoV2(**TINY, queue_size=24, proj_out=16)
    views = _views(8)
    queue_before = model.queue.bank.clone()
    with torch.no_grad():
        q = model.head(model.backbone(views[0]))
        k = F.normalize(model.key_head(model.key_backbone(views[1])), dim=1)
    feats = model.forward_views(views)
    assert len(feats) == 1  # the query encoder sees only the query view
    loss = model.loss(feats, views, torch.arange(8))
    torch.testing.assert_close(loss, moco_infonce(q, k, queue_before, 0.2))  # the loss used the old queue
    assert not torch.allclose(loss, moco_infonce(q, k, model.queue.bank, 0.2))
    torch.testing.assert_close(model.queue.bank[:8], k)  # then the keys were enqueued
    torch.testing.assert_close(model.queue.bank[8:], queue_before[8:], atol=0, rtol=0)
    assert int(model.queue.ptr) == 8
    loss.backward()  # enqueueing in place did not break the graph
    assert model.backbone.features[0].weight.grad is not None
    assert all(p.grad is None for p in model.key_backbone.parameters())


def test_moco_queue_size_must_be_a_multiple_of_the_global_batch():
    model = MoCoV2(**TINY, queue_size=30)
    views = _views(8)
    with pytest.raises(SSLError, match=r"K=30 .*global batch 8 .*multiple of 8 \(e\.g\. 32\)"):
        model.loss(model.forward_views(views), views, torch.arange(8))


def test_split_batch_norm_normalises_each_sub_batch():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    split = split_batch_norm(nn.Sequential(bn), 4)[0]
    assert isinstance(split, SplitBatchNorm2d)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    out = split(x)
    means, variances = [], []
    for c in x.chunk(4):
        ref_bn = nn.BatchNorm2d(3)
        ref_bn.load_state_dict(bn.state_dict())
        torch.testing.assert_close(out[len(means) * 2:len(means) * 2 + 2], ref_bn(c))
        means.append(ref_bn.running_mean)
        variances.append(ref_bn.running_var)
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0))
    assert not torch.allclose(out, bn(x))  # differs from whole-batch statistics
    bn.load_state_dict(split.state_dict())
    split.eval(), bn.eval()
    torch.testing.assert_close(split(x), bn(x))
    split.train()
    split.groups = 1
    bn.train()
    torch.testing.assert_close(split(x), bn(x))


# ---- MoCo v3 --------------------------------------------------------------------------------------------
def test_mocov3_heads_and_symmetric_loss():
    torch.manual_seed(0)
    model = MoCoV3(**TINY, proj_hidden=32, proj_out=16, pred_hidden=32)
    assert sum(isinstance(m, nn.Linear) for m in model.projector) == 3
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine
    assert sum(isinstance(m, nn.Linear) for m in model.predictor) == 2
    assert not isinstance(model.predictor[-1], nn.BatchNorm1d)
    assert [t for _, t in model.momentum_pairs()] == [model.momentum_backbone, model.momentum_projector]
    views = _views(6)
    loss = model.loss(model.forward_views(views), views, torch.arange(6))
    with torch.no_grad():
        q1, q2 = (model.predictor(model.projector(model.backbone(v))) for v in views)
        k1, k2 = (model.momentum_projector(model.momentum_backbone(v)) for v in views)
    torch.testing.assert_close(loss, mocov3_infonce(q1, k2, 0.2) + mocov3_infonce(q2, k1, 0.2))
    loss.backward()
    assert all(p.grad is None for p in model.momentum_backbone.parameters())


# ---- 2-process DDP ----------------------------------------------------------------------------------------
B = 4  # per process; the single-process reference gets WORLD * B
GRAD_ATOL, GRAD_RTOL = 1e-7, 1e-5


def build_moco(**kwargs) -> MoCoV2:
    torch.manual_seed(0)
    model = MoCoV2(**NORM_FREE, queue_size=16, proj_hidden=16, proj_out=8, **kwargs)
    return model.double()  # v2's head is norm-free already; float64: DDP's sums in another order stay within tolerance


def build_mocov3() -> MoCoV3:
    torch.manual_seed(0)
    model = MoCoV3(**NORM_FREE, proj_hidden=16, proj_out=8, pred_hidden=16)
    model.projector = mlp([model.backbone.num_features, 16, 16, 8], norm="none")
    model.predictor = mlp([8, 16, 8], norm="none")
    model.momentum_backbone = momentum_copy(model.backbone)
    model.momentum_projector = momentum_copy(model.projector)
    return model.double()  # float64, as build_moco


def _ddp_steps(model: nn.Module, init: Path, rank: int) -> dict:
    """Two loss evaluations on this rank's shard: the first backpropagated through DDP, the second
    (another batch) reads the queue the first one filled."""
    sl = slice(rank * B, (rank + 1) * B)
    views = [v[sl] for v in _views(WORLD * B, seed=1, dtype=torch.float64)]
    loss = ddp_loss_backward(model, init, views, torch.arange(WORLD * B)[sl])
    with torch.no_grad():
        views2 = [v[sl] for v in _views(WORLD * B, seed=2, dtype=torch.float64)]
        loss2 = model.loss(model.forward_views(views2), views2, None)
    return {"loss": loss, "loss2": loss2, "grads": grads(model),
            "state": {k: v.clone() for k, v in model.state_dict().items() if k.startswith("queue.")}}


def scenario_moco(rank: int, world: int, out: Path) -> dict:
    result = _ddp_steps(build_moco(), out / "moco_init.pt", rank)
    x = torch.arange(B * 3, dtype=torch.float).view(B, 3) + 100 * rank  # rows say where they came from
    shuffled, unshuffle = batch_shuffle_ddp(x)
    result.update(x=x, shuffled=shuffled, unshuffled=batch_unshuffle_ddp(shuffled, unshuffle))
    return result


def scenario_mocov3(rank: int, world: int, out: Path) -> dict:
    return _ddp_steps(build_mocov3(), out / "mocov3_init.pt", rank)


SCENARIOS = {"moco": scenario_moco, "mocov3": scenario_mocov3}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp_moco", SCENARIOS, {"moco_init.pt": build_moco, "mocov3_init.pt": build_mocov3})


def _reference(model: nn.Module) -> dict:
    views, views2 = (_views(WORLD * B, seed=s, dtype=torch.float64) for s in (1, 2))
    loss = model.loss(model.forward_views(views), views, None)
    loss.backward()
    with torch.no_grad():
        loss2 = model.loss(model.forward_views(views2), views2, None)
    return {"loss": loss, "loss2": loss2, "grads": grads(model),
            "state": {k: v.clone() for k, v in model.state_dict().items() if k.startswith("queue.")}}


def _check_against_single_process(results: list[dict], ref: dict) -> None:
    assert not torch.allclose(results[0]["loss"], results[1]["loss"]), "were the batches split?"
    for key in ("loss", "loss2"):  # each rank averages over its own queries: mean over ranks = global loss
        torch.testing.assert_close(torch.stack([r[key] for r in results]).mean(), ref[key], atol=1e-6, rtol=0)
    assert max(g.abs().max() for g in ref["grads"].values()) > 100 * GRAD_ATOL
    for r, res in enumerate(results):
        assert res["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(res["grads"][name], g, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=f"rank {r} {name}")
        for name, v in ref["state"].items():
            torch.testing.assert_close(res["state"][name], v, atol=1e-6, rtol=0, msg=f"rank {r} {name}")


def test_moco_v2_ddp_matches_single_process(ddp):
    results = ddp("moco")
    model = build_moco()
    model.load_state_dict(torch.load(ddp.out / "moco_init.pt", weights_only=True))
    ref = _reference(model)
    assert int(ref["state"]["queue.ptr"]) == 0 and int(ref["state"]["queue.filled"]) == 16  # 2 x 8 keys
    _check_against_single_process(results, ref)
    # shuffle-BN: each rank got a slice of one shared permutation of the global batch, and got its own rows back
    shuffled = torch.cat([r["shuffled"] for r in results])
    everything = torch.cat([r["x"] for r in results])
    assert sorted(shuffled[:, 0].tolist()) == sorted(everything[:, 0].tolist())
    for r in results:
        torch.testing.assert_close(r["unshuffled"], r["x"], atol=0, rtol=0)


def test_mocov3_ddp_matches_single_process(ddp):
    results = ddp("mocov3")
    model = build_mocov3()
    model.load_state_dict(torch.load(ddp.out / "mocov3_init.pt", weights_only=True))
    _check_against_single_process(results, _reference(model))


def test_mocov3_ddp_differs_without_gathered_keys():
    """Guard: with each rank's own keys only (labels not offset), the mean loss would differ."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(WORLD * B, 8, generator=g), torch.randn(WORLD * B, 8, generator=g)
    local = torch.stack([mocov3_infonce(q[r * B:(r + 1) * B], k[r * B:(r + 1) * B], 0.2) for r in range(WORLD)])
    assert (mocov3_infonce(q, k, 0.2) - local.mean()).abs() > 1e-3
    assert distributed.world_size() == 1


# ---- exact resume -------------------------------------------------------------------------------------------
def _model(cls):
    L.seed_everything(0)
    extra = dict(queue_size=16, proj_out=16) if cls is MoCoV2 else dict(proj_hidden=32, proj_out=16, pred_hidden=32)
    return cls(**dict(TINY, num_classes=10), optimizer="sgd", lr=0.5, warmup_epochs=1, momentum_base=0.9, **extra)


def _data() -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         dataset_options={"size": 32, "image_size": 16, "channels": 1})


def _perturb(model) -> None:  # restored state must not depend on init (queue included)
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.data.zero_()
    torch.nn.init.normal_(next(model.parameters()))


@pytest.mark.parametrize("cls", [MoCoV2, MoCoV3])
def test_resume_matches_uninterrupted(cls, tmp_path):
    # parameters, BN buffers, key encoder, queue + pointer, probe, optimizer state: bit-identical
    straight, *_ = check_resume_is_exact(lambda: _model(cls), _data, tmp_path, perturb=_perturb)
    sd_a = straight.state_dict()
    teacher = "key_backbone." if cls is MoCoV2 else "momentum_backbone."
    assert any(k.startswith(teacher) for k in sd_a)
    if cls is MoCoV2:
        assert int(sd_a["queue.filled"]) == 16 and int(sd_a["queue.ptr"]) == 0  # 8 steps x 8 keys wrapped
        init = _model(cls).state_dict()
        assert not torch.equal(sd_a["queue.bank"], init["queue.bank"])
        assert not torch.equal(sd_a["key_backbone.features.0.weight"], init["key_backbone.features.0.weight"])
