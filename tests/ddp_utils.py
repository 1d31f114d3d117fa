"""Run module-level *scenario* functions on 2 gloo processes (CPU) and collect what each rank returns.

A scenario is ``fn(rank, world, out_dir) -> dict`` defined at module level in a test file: spawned
children import that file by name, which works because pytest's default ``prepend`` import mode puts
``tests/`` on ``sys.path`` and the spawn start method hands the parent's ``sys.path`` to its children.
All scenarios share one spawn (starting a process that imports lightning costs seconds). The parent is
in no process group, so every ``ssl_lightning.distributed`` helper is a no-op there: it computes the
single-process reference on the global batch and compares.
"""
from __future__ import annotations

import datetime
import socket
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SPAWN_TIMEOUT_S = 120
Scenario = Callable[[int, int, Path], dict]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, scenarios: dict[str, Scenario]) -> None:
    """Every scenario in turn on this rank; a scenario that raises is recorded and the next one runs
    (the same code runs on every rank, so failures are symmetric and the collectives stay in step)."""
    torch.set_num_threads(1)  # 2 processes on a small CPU machine: no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, scenario in scenarios.items():
            try:
                results[name] = scenario(rank, world, Path(out_dir))
            except Exception:
                results[name] = {"error": traceback.format_exc()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ddp(scenarios: dict[str, Scenario], out_dir: Path, world: int = WORLD) -> list[dict]:
    """Each rank's ``{scenario name: result}``, in rank order."""
    ctx = mp.spawn(_worker, args=(world, free_port(), str(out_dir), scenarios), nprocs=world, join=False)
    try:
        waited = 0
        while not ctx.join(timeout=5):  # raises ProcessRaisedException with a child's traceback
            waited += 5
            if waited >= SPAWN_TIMEOUT_S:
                pytest.fail(f"the DDP workers did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


def results_getter(per_rank: list[dict], out: Path):
    """``get(name)`` -> the scenario's per-rank results; fails the test with a rank's traceback if it raised."""

    def get(name: str) -> list:
        results = [res[name] for res in per_rank]
        for r, res in enumerate(results):
            if isinstance(res, dict) and "error" in res:
                pytest.fail(f"scenario {name!r} raised on rank {r}:\n{res['error']}")
        return results

    get.out = out
    return get


class LossStep(torch.nn.Module):
    """What Lightning's DDP wrapper does with ``training_step``: the method's whole loss inside
    ``forward``, so DistributedDataParallel's reducer averages the gradients over processes in backward."""

    def __init__(self, method: torch.nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
        index = torch.arange(views[0].shape[0]) if index is None else index
        out = self.method.loss(self.method.forward_views(views), views, index)
        return out["loss"] if isinstance(out, dict) else out


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def ddp_loss_backward(model: torch.nn.Module, init: Path, views: list[torch.Tensor],
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """Load the shared initial weights, run this rank's views through DDP and backpropagate."""
    model.load_state_dict(torch.load(init, weights_only=True))
    ddp = torch.nn.parallel.DistributedDataParallel(LossStep(model))  # kept alive: its reducer averages in backward
    loss = ddp(views, index)
    loss.backward()
    return loss.detach()


def spawn_results(tmp_path_factory, name: str, scenarios: dict[str, Scenario],
                  inits: dict[str, Callable[[], torch.nn.Module]]):
    """A module fixture's body: save each builder's initial weights as ``<out>/<file>`` (the state every
    rank and the single-process reference start from), run the scenarios on 2 processes, return
    :func:`results_getter`'s ``get``."""
    out = tmp_path_factory.mktemp(name)
    for file, build in inits.items():
        torch.save(build().state_dict(), out / file)
    return results_getter(run_ddp(scenarios, out), out)


def norm_free_two_view(cls, **kwargs) -> torch.nn.Module:
    """``cls`` on a norm-free ConvNet with a norm-free 2-layer projector (SyncBatchNorm cannot run on CPU),
    its outputs scaled to std ~1 (the norm-free net's are ~1e-3, far below BN's eps): for methods whose
    loss uses batch statistics of the projections (Barlow Twins, VICReg)."""
    from ssl_lightning.heads import mlp

    torch.manual_seed(0)
    model = cls(backbone="convnet", backbone_kwargs={"norm": "none", "width": 8}, in_channels=1, num_classes=0,
                proj_hidden=32, proj_out=16, **kwargs)
    model.projector = mlp([model.backbone.num_features, 32, 16], norm="none")
    with torch.no_grad():
        model.projector[-1].weight.mul_(800)
    return model


def two_view_batch(per_process: int, image: int = 16, seed: int = 1, world: int = WORLD) -> list[torch.Tensor]:
    """Two random views of the global batch (``world * per_process`` images); rank r takes rows
    ``[r * per_process, (r + 1) * per_process)``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(world * per_process, 1, image, image, generator=g) for _ in range(2)]


def single_process_reference(model: torch.nn.Module, init: Path, views: list[torch.Tensor]
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """Loss, gradients and gradient scale (largest magnitude) of one process on the global batch."""
    model.load_state_dict(torch.load(init, weights_only=True))
    loss = LossStep(model)(views)
    loss.backward()
    ref = grads(model)
    assert len(ref) == len(list(model.parameters()))
    scale = float(max(g.abs().max() for g in ref.values()))
    assert scale > 1e-3
    return loss.detach(), ref, scale


def assert_grads_match(results: list[dict], ref: dict[str, torch.Tensor], scale: float) -> None:
    """Every rank's gradients (after DDP's averaging) equal the single-process ones, to a tolerance
    relative to their scale (a 1 / world_size error would be off by 50%)."""
    for r, res in enumerate(results):
        assert res["grads"].keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(res["grads"][name], g, atol=1e-5 * scale, rtol=1e-4,
                                       msg=lambda m, n=name: f"rank {r} {n}: {m}")
