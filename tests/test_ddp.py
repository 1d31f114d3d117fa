"""Two-process DDP tests (torch.distributed, gloo backend, CPU).

The low-level tests share one spawn of 2 processes (the module-scoped ``ddp`` fixture, plumbing in
``ddp_utils.py``): every rank runs every *scenario* (the ``scenario_*`` functions) and returns what it
computed; the parent computes the single-process reference on the global batch and compares.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_lightning import distributed
from ssl_lightning.heads import mlp
from ssl_lightning.losses import nt_xent
from ssl_lightning.methods import BYOL, NPID, NoiseAsTargets, SimCLR
from ssl_lightning.modules import MemoryBank, ema_update, momentum_copy
from ssl_lightning.semi import TemporalEnsemble

from ddp_utils import ddp_loss_backward, free_port, grads, spawn_results, WORLD  # tests/ is on sys.path
from test_nonfinite import check_one_rank_nan, scenario_one_rank_nan  # its 2-process check shares this spawn

B = 4  # images per process; the single-process reference gets the global batch of WORLD * B
IMAGE = 16
# SimCLR's gradients here are ~1e-4, so an absolute 1e-5 would hardly constrain them (observed
# DDP-vs-single-process differences: ~1e-9); BYOL's are ~1, where float32 summation order gives ~1e-7.
GRAD_ATOL, GRAD_RTOL = 1e-7, 1e-5


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp", SCENARIOS, {"simclr_init.pt": build_simclr, "byol_init.pt": build_byol,
                                                               "npid_init.pt": build_npid, "npid_softmax_init.pt":
                                                               lambda: build_npid(nce_k=0), "nat_init.pt": build_nat})


def _assert_close_dicts(got: dict, want: dict, atol: float, what: str, rtol: float = 0.0) -> None:
    assert got.keys() == want.keys(), f"{what}: different parameter sets"
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


# ---- models and data ------------------------------------------------------------------------------
# No batch norm anywhere: SyncBatchNorm does not run on CPU in this torch version, and plain BatchNorm
# normalises with per-process batch statistics, so a BN model legitimately differs between 2 x B and
# 1 x 2B. Without normalisation layers the distributed and single-process computations must agree.
NORM_FREE_CONVNET = {"norm": "none", "width": 8}


def build_simclr() -> SimCLR:
    torch.manual_seed(0)
    model = SimCLR(backbone="convnet", backbone_kwargs=NORM_FREE_CONVNET, in_channels=1, num_classes=0,
                   proj_hidden=32, proj_out=16)
    model.projector = mlp([model.backbone.num_features, 32, 16], norm="none")  # default projector has BN
    return model


def build_byol() -> BYOL:
    torch.manual_seed(0)
    model = BYOL(backbone="convnet", backbone_kwargs=NORM_FREE_CONVNET, in_channels=1, num_classes=0,
                 proj_hidden=32, proj_out=16, pred_hidden=32)
    # the default heads have BN: replace them by norm-free ones, then re-make the teachers from them
    model.projector = mlp([model.backbone.num_features, 32, 16], norm="none")
    model.predictor = mlp([16, 32, 16], norm="none")
    model.teacher_backbone = momentum_copy(model.backbone)
    model.teacher_projector = momentum_copy(model.projector)
    return model


def global_batch(seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(WORLD * B, 1, IMAGE, IMAGE, generator=g) for _ in range(2)]
    return views, torch.arange(WORLD * B)


def local_batch(rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rank r gets samples [r*B, (r+1)*B) of every view."""
    views, index = global_batch()
    sl = slice(rank * B, (rank + 1) * B)
    return [v[sl] for v in views], index[sl]


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def byol_step(model: BYOL) -> None:
    """One SGD step on the online network, then the EMA update of both teachers."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    opt.step()
    for student, teacher in model.momentum_pairs():
        ema_update(teacher, student, 0.99)


# ---- scenarios (run on every rank; return what the parent checks) -----------------------------------
def ddp_backward(model: nn.Module, init: Path, rank: int):
    """This rank's shard of the global batch through DDP, backpropagated from the shared initial weights."""
    views, index = local_batch(rank)
    return ddp_loss_backward(model, init, views, index), views, index


def scenario_simclr(rank: int, world: int, out: Path) -> dict:
    model = build_simclr()
    loss, views, index = ddp_backward(model, out / "simclr_init.pt", rank)
    local_only = model.loss(model.forward_views(views), views, index).detach()  # sanity: same as forward
    return {"loss": loss, "grads": grads(model), "check": local_only}


def scenario_byol(rank: int, world: int, out: Path) -> dict:
    model = build_byol()
    loss, _, _ = ddp_backward(model, out / "byol_init.pt", rank)
    result = {"loss": loss, "grads": grads(model)}
    byol_step(model)
    result["teacher"] = params(model.teacher_backbone) | {f"proj.{k}": v for k, v in params(model.teacher_projector).items()}
    result["student"] = params(model.backbone) | {f"proj.{k}": v for k, v in params(model.projector).items()}
    return result


BANK_SIZE, BANK_DIM, KEYS_PER_RANK, STEPS = 10, 4, 3, 5  # 5 x 6 = 30 keys into 10 rows: wraps around


def bank_keys(step: int) -> torch.Tensor:
    """The global keys of one enqueue (rank r contributes rows [r*KEYS_PER_RANK, (r+1)*KEYS_PER_RANK))."""
    return torch.randn(WORLD * KEYS_PER_RANK, BANK_DIM, generator=torch.Generator().manual_seed(100 + step))


def bank_updates(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (index, values) of one update: distinct rows of a 20-row bank, values random."""
    g = torch.Generator().manual_seed(200 + step)
    index = torch.randperm(20, generator=g)[: WORLD * KEYS_PER_RANK]
    return index, torch.randn(WORLD * KEYS_PER_RANK, BANK_DIM, generator=g)


def bank_state(bank: MemoryBank) -> dict:
    return {k: v.clone() for k, v in bank.state_dict().items()}


def scenario_memory_bank(rank: int, world: int, out: Path) -> dict:
    sl = slice(rank * KEYS_PER_RANK, (rank + 1) * KEYS_PER_RANK)
    torch.manual_seed(0)
    queue = MemoryBank(BANK_SIZE, BANK_DIM)  # random init, identical on every rank
    queue_states = []
    for step in range(STEPS):
        queue.enqueue(bank_keys(step)[sl])
        queue_states.append(bank_state(queue))
    table = MemoryBank(20, BANK_DIM, init="zeros")
    table_states = []
    for step in range(3):
        index, values = bank_updates(step)
        table.update(index[sl], values[sl])
        table_states.append(bank_state(table))
    return {"queue": queue_states, "table": table_states}


# ---- per-image state: NPID's memory bank, Z and noise; NAT's assignment ------------------------------------------
INSTANCE_SAMPLES = 16
# sample 5 is on both ranks (rank 0's 3rd row, rank 1's 2nd): one process on the global batch keeps the later row
INSTANCE_INDEX = [torch.tensor([3, 10, 5, 0, 7, 5, 1, 12]), torch.tensor([9, 2, 14, 6, 11, 4, 15, 8])]


def build_npid(nce_k: int = 6) -> NPID:
    torch.manual_seed(0)
    return NPID(backbone="convnet", backbone_kwargs=NORM_FREE_CONVNET, in_channels=1, num_classes=0, embed_dim=8,
                nce_k=nce_k, temperature=0.5, num_samples=INSTANCE_SAMPLES)


def build_nat() -> NoiseAsTargets:
    torch.manual_seed(0)
    return NoiseAsTargets(backbone="convnet", backbone_kwargs=NORM_FREE_CONVNET, in_channels=1, num_classes=0,
                          target_dim=8, num_samples=INSTANCE_SAMPLES)


def instance_batch(step: int, rank: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step ``step``'s global batch (one view, indices ``INSTANCE_INDEX[step]``), or rank ``rank``'s shard of it."""
    views, index = [global_batch(seed=10 + step)[0][0]], INSTANCE_INDEX[step]
    if rank is None:
        return views, index
    sl = slice(rank * B, (rank + 1) * B)
    return [v[sl] for v in views], index[sl]


def instance_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in ("memory", "normaliser", "noise",
                                                                                       "noise_targets")}


def scenario_instance_state(rank: int, world: int, out: Path) -> dict:
    """Per method: step 0 through DDP (loss, gradients, state after), then step 1's forward (state after)."""
    result = {}
    for name, build in (("npid", build_npid), ("npid_softmax", lambda: build_npid(nce_k=0)), ("nat", build_nat)):
        model = build()
        views, index = instance_batch(0, rank)
        loss = ddp_loss_backward(model, out / f"{name}_init.pt", views, index)
        result[name] = {"loss": loss, "grads": grads(model), "state0": instance_state(model)}
        with torch.no_grad():
            views, index = instance_batch(1, rank)
            model.loss(model.forward_views(views), views, index)
        result[name]["state1"] = instance_state(model)
    return result


GATHER_ROWS = 3


def _rank_tensor(rank: int, seed: int) -> torch.Tensor:
    return torch.randn(GATHER_ROWS, 2, generator=torch.Generator().manual_seed(seed + rank))


def scenario_gather(rank: int, world: int, out: Path) -> dict:
    assert distributed.world_size() == world and distributed.rank() == rank
    x = _rank_tensor(rank, 0).requires_grad_()
    gathered = distributed.gather(x)
    noncontig = distributed.gather(_rank_tensor(rank, 0).t())  # (2, 3), non-contiguous
    ints = distributed.gather(torch.arange(GATHER_ROWS) + 10 * rank)

    y = _rank_tensor(rank, 0).requires_grad_()
    with_grad = distributed.gather_with_grad(y)
    weights = _rank_tensor(rank, 50).repeat(world, 1) * torch.arange(1, world * GATHER_ROWS + 1).unsqueeze(1)
    (with_grad * weights).sum().backward()  # rank r's loss touches every rank's rows
    return {"gathered": gathered, "gathered_requires_grad": gathered.requires_grad, "noncontig": noncontig,
            "ints": ints, "with_grad": with_grad.detach(), "with_grad_requires_grad": with_grad.requires_grad,
            "weights": weights, "grad": y.grad}


ENSEMBLE_SAMPLES, ENSEMBLE_CLASSES = 10, 7


def ensemble_rows(rank: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 predicts samples 0, 2, 4, 6; rank 1 samples 1, 3, 5, 6: sample 6 is on both (rank 1's row wins)."""
    index = torch.tensor([[0, 2, 4, 6], [1, 3, 5, 6]][rank])
    return index, torch.rand(4, ENSEMBLE_CLASSES, generator=torch.Generator().manual_seed(100 + 10 * epoch + rank))


def scenario_temporal_ensemble(rank: int, world: int, out: Path) -> dict:
    ensemble = TemporalEnsemble(ENSEMBLE_SAMPLES, ENSEMBLE_CLASSES)
    for epoch in range(2):
        ensemble.record(*ensemble_rows(rank, epoch))
        ensemble.end_epoch()
    return {k: v.clone() for k, v in ensemble.state_dict().items()}


SCENARIOS = {"simclr": scenario_simclr, "byol": scenario_byol, "memory_bank": scenario_memory_bank,
             "gather": scenario_gather, "temporal_ensemble": scenario_temporal_ensemble,
             "nonfinite": scenario_one_rank_nan, "instance_state": scenario_instance_state}


# ---- tests ------------------------------------------------------------------------------------------
def _reference_step(model: nn.Module) -> tuple[torch.Tensor, dict]:
    views, index = global_batch()
    loss = model.loss(model.forward_views(views), views, index)
    loss.backward()
    return loss.detach(), grads(model)


def test_simclr_ddp_matches_single_process(ddp):
    results = ddp("simclr")
    model = build_simclr()
    model.load_state_dict(torch.load(ddp.out / "simclr_init.pt", weights_only=True))
    ref_loss, ref_grads = _reference_step(model)

    for res in results:
        torch.testing.assert_close(res["check"], res["loss"], atol=1e-6, rtol=0)
    losses = torch.stack([res["loss"] for res in results])
    # each rank averages over its own anchors against the gathered global batch: mean over ranks = global loss
    torch.testing.assert_close(losses.mean(), ref_loss, atol=1e-5, rtol=0)
    assert not torch.allclose(losses[0], losses[1]), "both ranks computed the same loss: were batches split?"
    assert len(ref_grads) == len(list(model.parameters()))
    assert max(g.abs().max() for g in ref_grads.values()) > 100 * GRAD_ATOL  # the tolerance is a real constraint
    for r, res in enumerate(results):
        _assert_close_dicts(res["grads"], ref_grads, atol=GRAD_ATOL, rtol=GRAD_RTOL, what=f"rank {r} grad")


def test_simclr_ddp_differs_without_gather():
    """Guard for the test above: with local negatives only, the mean loss would NOT match."""
    model = build_simclr()
    views, index = global_batch()
    with torch.no_grad():
        z = [model.projector(f) for f in model.forward_views(views)]
        full = nt_xent(*z, model.hparams.temperature)
        local = torch.stack([nt_xent(z[0][r * B:(r + 1) * B], z[1][r * B:(r + 1) * B], model.hparams.temperature)
                             for r in range(WORLD)]).mean()
    assert (full - local).abs() > 1e-3


def test_byol_ddp_matches_single_process(ddp):
    results = ddp("byol")
    model = build_byol()
    model.load_state_dict(torch.load(ddp.out / "byol_init.pt", weights_only=True))
    ref_loss, ref_grads = _reference_step(model)
    byol_step(model)
    ref_teacher = params(model.teacher_backbone) | {f"proj.{k}": v for k, v in params(model.teacher_projector).items()}
    ref_student = params(model.backbone) | {f"proj.{k}": v for k, v in params(model.projector).items()}

    torch.testing.assert_close(torch.stack([res["loss"] for res in results]).mean(), ref_loss, atol=1e-5, rtol=0)
    assert not any("teacher" in n for n in ref_grads), "the teachers must get no gradient"
    assert max(g.abs().max() for g in ref_grads.values()) > 100 * GRAD_ATOL
    for r, res in enumerate(results):
        _assert_close_dicts(res["grads"], ref_grads, atol=GRAD_ATOL, rtol=GRAD_RTOL, what=f"rank {r} grad")
        _assert_close_dicts(res["student"], ref_student, atol=1e-6, what=f"rank {r} student after SGD step")
        _assert_close_dicts(res["teacher"], ref_teacher, atol=1e-6, what=f"rank {r} teacher after EMA")
    init = torch.load(ddp.out / "byol_init.pt", weights_only=True)
    assert not torch.allclose(ref_teacher["features.0.weight"], init["teacher_backbone.features.0.weight"])


def test_memory_bank_ddp_matches_single_process(ddp):
    results = ddp("memory_bank")

    torch.manual_seed(0)
    queue = MemoryBank(BANK_SIZE, BANK_DIM)
    table = MemoryBank(20, BANK_DIM, init="zeros")
    for step in range(STEPS):
        queue.enqueue(bank_keys(step))  # the concatenated keys of both ranks, in rank order
        for r, res in enumerate(results):
            _assert_close_dicts(res["queue"][step], bank_state(queue), atol=0, what=f"rank {r} queue step {step}")
    assert int(queue.ptr) == (STEPS * WORLD * KEYS_PER_RANK) % BANK_SIZE and int(queue.filled) == BANK_SIZE
    for step in range(3):
        table.update(*bank_updates(step))
        for r, res in enumerate(results):
            _assert_close_dicts(res["table"][step], bank_state(table), atol=0, what=f"rank {r} table step {step}")
    assert (table.bank.abs().sum(1) > 0).sum() > WORLD * KEYS_PER_RANK  # rows from several updates landed


@pytest.mark.parametrize("name", ["npid", "npid_softmax", "nat"])
def test_instance_state_ddp_equals_one_process_on_the_global_batch(ddp, name):
    """Bank writes (rank order, duplicates), Z, noise draws and NAT's Hungarian assignment on 2 processes equal one
    process's on the global batch; so do the loss (mean over ranks) and the gradients."""
    results = [res[name] for res in ddp("instance_state")]
    build = {"npid": build_npid, "npid_softmax": lambda: build_npid(nce_k=0), "nat": build_nat}[name]
    model = build()
    model.load_state_dict(torch.load(ddp.out / f"{name}_init.pt", weights_only=True))
    init = instance_state(model)
    views, index = instance_batch(0)
    ref_loss = model.loss(model.forward_views(views), views, index)
    ref_loss.backward()
    ref_grads, state0 = grads(model), instance_state(model)
    with torch.no_grad():
        views, index = instance_batch(1)
        model.loss(model.forward_views(views), views, index)
    state1 = instance_state(model)

    torch.testing.assert_close(torch.stack([res["loss"] for res in results]).mean(), ref_loss.detach(), atol=1e-5, rtol=0)
    assert max(g.abs().max() for g in ref_grads.values()) > 100 * GRAD_ATOL
    for r, res in enumerate(results):
        _assert_close_dicts(res["grads"], ref_grads, atol=GRAD_ATOL, rtol=GRAD_RTOL, what=f"rank {r} {name} grad")
        for step, want in enumerate((state0, state1)):
            got = res[f"state{step}"]
            assert got.keys() == want.keys()
            for key in want:  # integer state (assignment, draws) exactly; float state to float32 rounding
                atol = 0 if not want[key].is_floating_point() else 1e-6
                torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0 if atol == 0 else 1e-5,
                                           msg=lambda m, k=key: f"rank {r} {name} step {step} {k}: {m}")
    if name.startswith("npid"):
        bank0, bank_init = state0["memory.bank"], init["memory.bank"]
        written = torch.zeros(INSTANCE_SAMPLES, dtype=torch.bool)
        written[INSTANCE_INDEX[0]] = True
        assert not torch.equal(bank0[written], bank_init[written]) and torch.equal(bank0[~written], bank_init[~written])
        if name == "npid":
            assert float(state1["normaliser.z"]) == float(state0["normaliser.z"]) > 0  # frozen after step 0
            assert int(state1["noise.draws"]) == 2
    else:
        moved = state1["noise_targets.assignment"]
        assert sorted(moved.tolist()) == list(range(INSTANCE_SAMPLES)) and not torch.equal(moved, torch.arange(16))


def test_temporal_ensemble_ddp_equals_one_process_in_rank_order(ddp):
    reference = TemporalEnsemble(ENSEMBLE_SAMPLES, ENSEMBLE_CLASSES)  # one process: both ranks' rows, rank order
    for epoch in range(2):
        (i0, p0), (i1, p1) = ensemble_rows(0, epoch), ensemble_rows(1, epoch)
        reference.record(torch.cat([i0, i1]), torch.cat([p0, p1]))
        reference.end_epoch()
    for r, state in enumerate(ddp("temporal_ensemble")):
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"rank {r} {n}: {m}")
    last = [ensemble_rows(1, epoch)[1][3] for epoch in range(2)]  # sample 6: rank 1's rows, written last
    want = (0.6 * 0.4 * last[0] + 0.4 * last[1]) / (1 - 0.6 ** 2)
    torch.testing.assert_close(reference.targets(torch.tensor([6]))[0], want)


def test_gather_and_gather_with_grad(ddp):
    results = ddp("gather")
    rows = torch.cat([_rank_tensor(r, 0) for r in range(WORLD)])
    for r, res in enumerate(results):
        torch.testing.assert_close(res["gathered"], rows, atol=0, rtol=0)  # rank order
        assert not res["gathered_requires_grad"]
        torch.testing.assert_close(res["noncontig"], torch.cat([_rank_tensor(s, 0).t() for s in range(WORLD)]))
        torch.testing.assert_close(res["ints"], torch.cat([torch.arange(GATHER_ROWS) + 10 * s for s in range(WORLD)]))
        torch.testing.assert_close(res["with_grad"], rows, atol=0, rtol=0)
        assert res["with_grad_requires_grad"]
    # d(sum_s loss_s)/dx_r: rank r's rows of every rank's weights, summed over ranks
    total_weights = sum(res["weights"] for res in results)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["grad"], total_weights[r * GATHER_ROWS:(r + 1) * GATHER_ROWS], atol=1e-6, rtol=0)


def test_nonfinite_loss_on_one_rank_stops_or_skips_both(ddp):
    """A NaN loss on rank 1 only, through Lightning's DDP: both ranks stop together, or both skip the step."""
    check_one_rank_nan(ddp("nonfinite"))


def test_distributed_helpers_are_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.gather(x) is x
    assert distributed.gather_with_grad(x) is x


# ---- end to end through Lightning ---------------------------------------------------------------------
def test_lightning_ddp_spawn_simclr_with_knn(tmp_path, monkeypatch):
    import lightning as L

    from ssl_lightning import SSLDataModule
    from ssl_lightning.callbacks import KNNMonitor

    # our own free port, removed from the environment again after the test (Lightning would otherwise
    # leave MASTER_ADDR/MASTER_PORT set in this process)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.manual_seed(0)
    model = SimCLR(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, proj_hidden=32, proj_out=16,
                   warmup_epochs=0)
    data = SSLDataModule(dataset="synthetic", batch_size=8, num_workers=0, pin_memory=False,
                         dataset_options={"size": 64, "channels": 1, "image_size": 28}, image_size=28)
    # 64 images / (8 per process x 2) = 4 steps per epoch, so max_steps=2 ends before the epoch's
    # validation: val_check_interval=2 runs validation (and the kNN monitor) after the 2nd step
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=2,
                        callbacks=[KNNMonitor()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.state.finished, trainer.state
    metrics = trainer.callback_metrics
    assert "val/knn_top1" in metrics, sorted(metrics)
    assert 0.0 <= float(metrics["val/knn_top1"]) <= 1.0
    assert torch.isfinite(metrics["train/loss"])


# ---- CPC: every process's patches are the negatives (gathered with gradient) ------------------------------------
CPC_B = 2  # images per process, 3 x 3 patches each: 36 candidates in the global batch


def build_cpc():
    from ssl_lightning.methods import CPC

    torch.manual_seed(0)  # the same weights on every rank and in the parent (DDP also broadcasts rank 0's)
    return CPC(backbone="convnet", backbone_kwargs={"norm": "layer", "width": 4}, in_channels=1, num_classes=0,
               patch=8, stride=4, steps=2, context_blocks=1, flip=False)


def cpc_images() -> torch.Tensor:
    return torch.randn(WORLD * CPC_B, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def scenario_cpc(rank: int, world: int, out: Path) -> dict:
    from ddp_utils import LossStep

    model = build_cpc()
    ddp = torch.nn.parallel.DistributedDataParallel(LossStep(model))
    loss = ddp([cpc_images()[rank * CPC_B:(rank + 1) * CPC_B]])
    loss.backward()
    return {"loss": loss.detach(), "grads": grads(model)}


SCENARIOS["cpc"] = scenario_cpc


def test_cpc_ddp_equals_one_process_on_the_global_batch(ddp):
    from ddp_utils import LossStep, assert_grads_match

    results = ddp("cpc")
    model = build_cpc()
    images = cpc_images()
    ref_loss = LossStep(model)([images])
    ref_loss.backward()
    ref = grads(model)
    assert len(ref) == len(list(model.parameters()))
    losses = torch.stack([res["loss"] for res in results])
    # each rank averages over its own predictions against all 36 patches: the mean over ranks is the global loss
    torch.testing.assert_close(losses.mean(), ref_loss.detach(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(losses[0], losses[1]), "both ranks computed the same loss: were the images split?"
    assert_grads_match(results, ref, float(max(g.abs().max() for g in ref.values())))
    with torch.no_grad():  # guard: with each process's own patches only, the loss would differ
        local = torch.stack([LossStep(model)([images[r * CPC_B:(r + 1) * CPC_B]]) for r in range(WORLD)]).mean()
    assert (local - ref_loss.detach()).abs() > 1e-3


# ---- Deep InfoMax: the negatives (other images' local maps) gathered with gradient ------------------------------------
DIM_ESTIMATORS = ("jsd", "dv", "infonce")


def build_dim(estimator: str, gamma: float = 0.0):
    """Norm-free Deep InfoMax (local and global terms; ``gamma`` the prior's, whose samples are random): BatchNorm in the
    MI networks and the encoding normalises per process, so it is replaced by the identity (LayerNorm stays)."""
    from ssl_lightning.methods import DeepInfoMax

    torch.manual_seed(0)
    model = DeepInfoMax(backbone="convnet", backbone_kwargs=NORM_FREE_CONVNET, in_channels=1, num_classes=0,
                        estimator=estimator, alpha=0.5, beta=1.0, gamma=gamma, mi_units=16, encoding_dim=8,
                        encoding_hidden=16)

    def strip(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, nn.Identity())
            else:
                strip(child)

    strip(model)
    return model


def scenario_dim(rank: int, world: int, out: Path) -> dict:
    from ddp_utils import LossStep

    results = {}
    for estimator in DIM_ESTIMATORS:
        model = build_dim(estimator)
        views, index = local_batch(rank)
        ddp = torch.nn.parallel.DistributedDataParallel(LossStep(model))
        loss = ddp(views[:1], index)
        loss.backward()
        results[estimator] = {"loss": loss.detach(), "grads": grads(model)}
    model = build_dim("jsd", gamma=0.1)  # the prior term's gradient penalty (double backward) under DDP
    views, index = local_batch(rank)
    torch.manual_seed(rank)  # each process its own prior samples
    ddp = torch.nn.parallel.DistributedDataParallel(LossStep(model))
    ddp(views[:1], index).backward()
    results["prior"] = {"grads": grads(model)}
    return results


SCENARIOS["dim"] = scenario_dim


@pytest.mark.parametrize("estimator", DIM_ESTIMATORS)
def test_dim_ddp_equals_one_process_on_the_global_batch(ddp, estimator):
    results = [res[estimator] for res in ddp("dim")]
    model = build_dim(estimator)
    views, index = global_batch()
    ref_loss, ref_grads = _reference_step_views(model, views[:1], index)
    losses = torch.stack([res["loss"] for res in results])
    torch.testing.assert_close(losses.mean(), ref_loss, atol=1e-5, rtol=1e-5)  # per-process losses average to it
    assert not torch.allclose(losses[0], losses[1]), "both ranks computed the same loss: were batches split?"
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    assert len(ref_grads) == len(list(model.parameters())) and scale > 1e-4
    for r, res in enumerate(results):
        _assert_close_dicts(res["grads"], ref_grads, atol=1e-5 * scale, rtol=1e-4, what=f"rank {r} {estimator} grad")
    # guard: with each process's own images only as negatives the gradients would differ (JSD's means barely move)
    model.zero_grad()
    torch.stack([LossStepNoGather(model)(views[0][r * B:(r + 1) * B]) for r in range(WORLD)]).mean().backward()
    gap = max(float((g - ref_grads[n]).abs().max()) for n, g in grads(model).items())
    assert gap > 10 * 1e-5 * scale, f"local-only negatives: gradients within {gap / scale:.1e} (not 10x the tolerance)"


def _reference_step_views(model: nn.Module, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = model.loss(model.forward_views(views), views, index)["loss"]
    loss.backward()
    return loss.detach(), grads(model)


class LossStepNoGather(nn.Module):
    """Deep InfoMax's loss on one shard alone (what a process would compute without the gather)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.loss(self.model.forward_views([x]), [x], torch.arange(x.shape[0]))["loss"]


def test_dim_prior_discriminator_trains_under_ddp(ddp):
    """With the prior term (its gradient penalty differentiates the discriminator twice) DDP still averages every
    gradient: both processes hold the same, finite, non-zero gradients of the encoder and the discriminator."""
    g0, g1 = (res["prior"]["grads"] for res in ddp("dim"))
    assert g0.keys() == g1.keys() and any(n.startswith("discriminator.") for n in g0)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], msg=name)
        assert torch.isfinite(g0[name]).all()
    assert g0["discriminator.0.weight"].abs().sum() > 0 and g0["encoding.0.weight"].abs().sum() > 0
# ---- DeepCluster: whole-dataset features gathered in rank order, clustered on rank 0, labels broadcast -------------
DC_IMAGES = 11  # not a multiple of the processes: the last shard is shorter


def deepcluster_setup():
    from ssl_lightning.methods import DeepCluster

    torch.manual_seed(0)
    model = DeepCluster(backbone="convnet", backbone_kwargs={"width": 4}, in_channels=1, num_classes=0,
                        num_clusters=3, pca_dim=4).eval()  # eval mode: BatchNorm uses its running statistics
    g = torch.Generator().manual_seed(7)
    centres = 3 * torch.randn(3, 1, IMAGE, IMAGE, generator=g)  # 3 well-separated kinds of image
    images = centres[torch.arange(DC_IMAGES) % 3] + 0.1 * torch.randn(DC_IMAGES, 1, IMAGE, IMAGE, generator=g)
    return model, [(img, 0) for img in images]


def scenario_deepcluster(rank: int, world: int, out: Path) -> dict:
    from ssl_lightning.methods.clustering.epoch_clustering import cluster_on_rank_zero, gather_dataset_features

    model, dataset = deepcluster_setup()
    feats = gather_dataset_features(model.cluster_features, dataset, batch_size=2, device=torch.device("cpu"))
    labels, objective = cluster_on_rank_zero(feats, 3, 4, 20, seed=1)
    return {"features": feats, "labels": labels, "objective": objective}


SCENARIOS["deepcluster"] = scenario_deepcluster


def test_deepcluster_ddp_features_and_labels_equal_one_process_on_the_whole_dataset(ddp):
    from ssl_lightning.methods.clustering.epoch_clustering import cluster_on_rank_zero, gather_dataset_features

    model, dataset = deepcluster_setup()
    with torch.no_grad():
        want = model.cluster_features(torch.stack([img for img, _ in dataset]))
    assert torch.allclose(gather_dataset_features(model.cluster_features, dataset, 4, torch.device("cpu")), want, atol=1e-6)
    labels, objective = cluster_on_rank_zero(want, 3, 4, 20, seed=1)
    for res in ddp("deepcluster"):
        assert res["features"].shape == want.shape
        torch.testing.assert_close(res["features"], want, atol=1e-5, rtol=1e-5)  # every image once, in order
        assert torch.equal(res["labels"], labels)  # rank 0's clustering, on every rank
        assert res["objective"] == pytest.approx(objective, rel=1e-4)
    assert torch.unique(labels).numel() == 3
# ---- semi-supervised: FixMatch's confidence mask and loss, MixMatch's label guess and loss -----------------
# Both are per-sample means without a gather: with equal batches per process, DDP's averaged gradients and the
# mean of the per-process losses must equal one process on the global batch, and the masks / guesses its rows.
# (BatchNorm's statistics are per process unless the layers are synchronised: norm-free models here, BatchNorm
# ones with AllReduceSyncBatchNorm below.)
SEMI_B, SEMI_MU, SEMI_CLASSES = 4, 2, 5


def build_semi(cls, **kwargs) -> nn.Module:
    """``cls`` on the norm-free ConvNet, its classifier scaled so that the predictions are far from uniform."""
    torch.manual_seed(0)
    model = cls(backbone="convnet", backbone_kwargs=NORM_FREE_CONVNET, in_channels=1, num_classes=SEMI_CLASSES,
                ema_decay=None, **kwargs)
    with torch.no_grad():
        model.classifier.weight.mul_(90)
    model.unlabelled_weight = lambda: 1.0  # outside a fit (it reads the trainer's step otherwise)
    return model


def semi_batch(rank: int | None = None, views: int = 2, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The global batch (rank None) or rank ``rank``'s rows of it: labelled x, y and the unlabelled views."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * SEMI_B, 1, IMAGE, IMAGE, generator=g)
    y = torch.randint(SEMI_CLASSES, (WORLD * SEMI_B,), generator=g)
    u = [torch.randn(WORLD * SEMI_MU * SEMI_B, 1, IMAGE, IMAGE, generator=g) for _ in range(views)]
    if rank is None:
        return x, y, u
    rows, urows = slice(rank * SEMI_B, (rank + 1) * SEMI_B), slice(rank * SEMI_MU * SEMI_B, (rank + 1) * SEMI_MU * SEMI_B)
    return x[rows], y[rows], [v[urows] for v in u]


class SemiStep(nn.Module):
    """The method's whole objective inside ``forward`` (what Lightning's DDP wrapper does with training_step);
    also returns the weak view's detached confidence mask / pseudo-labels or the label guess."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, x, y, views):
        from ssl_lightning.losses.semi_supervised import fixmatch_loss, guess_labels
        from ssl_lightning.methods.semi_supervised import FixMatch, SemiBatch

        batch = SemiBatch(x, y, torch.arange(x.shape[0]), list(views), torch.arange(views[0].shape[0]))
        if isinstance(self.method, FixMatch):
            loss = self.method.objective(batch)["loss"]
            _, mask, labels = fixmatch_loss(*batch.view_logits, self.method.hparams.threshold)
            return loss, mask, labels.float()
        with torch.no_grad():
            guess = guess_labels([self.method.logits(v) for v in views], self.method.hparams.temperature)
        return self.method.objective(batch)["loss"], guess, guess


FIXMATCH_THRESHOLD = 0.86  # between confidences of the weak views (0.852 and 0.873)


def semi_models() -> dict:
    from ssl_lightning.methods import FixMatch, MixMatch

    # MixMatch with alpha 0: no mixing partners (a per-process shuffle cannot equal the global one), all else as is
    return {"fixmatch": lambda: build_semi(FixMatch, threshold=FIXMATCH_THRESHOLD),
            "mixmatch": lambda: build_semi(MixMatch, alpha=0.0)}


def scenario_semi(rank: int, world: int, out: Path) -> dict:
    results = {}
    for name, build in semi_models().items():
        model = build()
        ddp = torch.nn.parallel.DistributedDataParallel(SemiStep(model))
        loss, rows, labels = ddp(*semi_batch(rank))
        loss.backward()
        results[name] = {"loss": loss.detach(), "rows": rows, "labels": labels, "grads": grads(model)}
    return results


SCENARIOS["semi"] = scenario_semi


# ---- the same with BatchNorm: AllReduceSyncBatchNorm (trainer.sync_batchnorm on CPU) ------------------------
# FixMatch's one forward over labelled + weak + strong and MixMatch's label-guess passes normalise with batch
# statistics; with the layers synchronised, the global batch's statistics (hence masks, guesses, loss, gradients
# and the running statistics) are one process's. (MixMatch's mixed batches are interleaved per process, so its
# whole objective is compared norm-free above.)
def build_semi_bn(name: str) -> nn.Module:
    """FixMatch / MixMatch on the ConvNet with BatchNorm; FixMatch's threshold between the 8th and 9th of the 16
    weak-view confidences of the global batch (so that the mask keeps some and drops some)."""
    import copy

    from ssl_lightning.methods import FixMatch, MixMatch

    torch.manual_seed(0)
    cls = FixMatch if name == "fixmatch" else MixMatch
    model = cls(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=SEMI_CLASSES,
                ema_decay=None)
    with torch.no_grad():
        model.classifier.weight.mul_(30)
    model.unlabelled_weight = lambda: 1.0
    if name == "fixmatch":
        from ssl_lightning.methods.semi_supervised import SemiBatch

        x, y, views = semi_batch()
        batch = SemiBatch(x, y, torch.arange(x.shape[0]), views, torch.arange(views[0].shape[0]))
        copy.deepcopy(model).objective(batch)  # fills batch.view_logits
        conf = torch.sort(torch.softmax(batch.view_logits[0].detach(), 1).max(1).values).values
        model.hparams.threshold = float(conf[7] + conf[8]) / 2
    return model


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


def scenario_semi_bn(rank: int, world: int, out: Path) -> dict:
    from ssl_lightning.modules import AllReduceSyncBatchNorm

    results = {}
    for name in ("fixmatch", "mixmatch"):
        model = AllReduceSyncBatchNorm().apply(build_semi_bn(name))
        ddp = torch.nn.parallel.DistributedDataParallel(SemiStep(model))
        loss, rows, labels = ddp(*semi_batch(rank))
        loss.backward()
        results[name] = {"loss": loss.detach(), "rows": rows, "labels": labels, "grads": grads(model),
                         "buffers": bn_buffers(model)}
    return results


SCENARIOS["semi_bn"] = scenario_semi_bn


def test_all_reduce_batchnorm_ddp_equals_one_process_on_the_global_batch(ddp):
    fixmatch, mixmatch = build_semi_bn("fixmatch"), build_semi_bn("mixmatch")
    loss, rows, labels = SemiStep(fixmatch)(*semi_batch())
    loss.backward()
    per_rank = [res["fixmatch"] for res in ddp("semi_bn")]
    assert 0 < rows.sum() < rows.numel()
    torch.testing.assert_close(torch.cat([r["rows"] for r in per_rank]), rows)
    torch.testing.assert_close(torch.cat([r["labels"] for r in per_rank]), labels)
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, loss.detach(), atol=1e-6, rtol=1e-5)
    ref, scale = grads(fixmatch), float(max(g.abs().max() for g in grads(fixmatch).values()))
    buffers = bn_buffers(fixmatch)
    assert any(not torch.equal(b, torch.zeros_like(b)) for n, b in buffers.items() if "mean" in n)
    for res in per_rank:
        _assert_close_dicts(res["grads"], ref, atol=1e-5 * scale, rtol=1e-4, what="FixMatch with BN")
        _assert_close_dicts(res["buffers"], buffers, atol=1e-6, rtol=1e-5, what="BN running statistics")
    # MixMatch: the label guess of the global batch (its passes use batch statistics, leave running ones alone)
    _, guess, _ = SemiStep(mixmatch)(*semi_batch())
    got = torch.cat([res["mixmatch"]["rows"] for res in ddp("semi_bn")])
    torch.testing.assert_close(got, guess, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["fixmatch", "mixmatch"])
def test_semi_mask_guess_and_loss_ddp_equal_one_process_on_the_global_batch(ddp, name):
    model = semi_models()[name]()
    loss, rows, labels = SemiStep(model)(*semi_batch())
    loss.backward()
    ref = grads(model)
    per_rank = [res[name] for res in ddp("semi")]
    if name == "fixmatch":
        assert 0 < rows.sum() < rows.numel()  # some pseudo-labels kept, some masked: the mask matters
    torch.testing.assert_close(torch.cat([r["rows"] for r in per_rank]), rows, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["labels"] for r in per_rank]), labels, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, loss.detach(), atol=1e-6, rtol=1e-5)
    scale = float(max(g.abs().max() for g in ref.values()))
    for r, res in enumerate(per_rank):
        assert res["grads"].keys() == ref.keys()
        for key, g in ref.items():
            torch.testing.assert_close(res["grads"][key], g, atol=1e-5 * scale, rtol=1e-4,
                                       msg=lambda m, k=key: f"rank {r} {k}: {m}")
