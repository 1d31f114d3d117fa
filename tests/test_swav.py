"""SwAV: Sinkhorn-Knopp codes, the swapped-prediction loss, prototypes (normalised, frozen), the queue,
2-process DDP equivalence and exact resume."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from ssl_lightning import SSLDataModule
from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.swav import sinkhorn, swav_loss
from ssl_lightning.methods.joint_embedding.swav import SwAV
from ssl_lightning.registry import SSLError

from ddp_utils import ddp_loss_backward, spawn_results, WORLD  # tests/ is on sys.path
from resume_utils import check_resume_is_exact


# ---- plain transcriptions of the paper / official code (numpy, float64) -------------------------------
def plain_sinkhorn(scores: np.ndarray, eps: float = 0.05, iters: int = 3) -> np.ndarray:
    """Algorithm of main_swav.py distributed_sinkhorn, one process: Q = exp(S/eps)^T, K x B."""
    Q = np.exp(scores / eps).T
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(iters):
        Q = Q / Q.sum(axis=1, keepdims=True) / K  # every prototype gets 1/K of the mass
        Q = Q / Q.sum(axis=0, keepdims=True) / B  # every sample gets 1/B
    return (Q * B).T


def plain_loss(scores: list[np.ndarray], assign=(0, 1), T: float = 0.1, queue=None) -> float:
    """1/|A| sum_t 1/(S-1) sum_{s != t} mean_b -sum_k q_t log softmax(scores_s / T), by explicit loops."""
    total = 0.0
    for i, t in enumerate(assign):
        out = scores[t] if queue is None else np.concatenate([queue[i], scores[t]])
        q = plain_sinkhorn(out)[-len(scores[t]):]
        pair_sum = 0.0
        for s in range(len(scores)):
            if s == t:
                continue
            x = scores[s] / T
            log_p = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
            per_sample = [-(q[b] * log_p[b]).sum() for b in range(len(x))]
            pair_sum += np.mean(per_sample)
        total += pair_sum / (len(scores) - 1)
    return total / len(assign)


def random_scores(n_crops=4, B=6, K=5, D=8, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    C = nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    return [nn.functional.normalize(torch.randn(B, D, generator=g), dim=1) @ C.T for _ in range(n_crops)]


def test_sinkhorn_matches_plain_transcription_and_lightly():
    from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

    scores = random_scores(1, B=12, K=7)[0]
    q = sinkhorn(scores)
    torch.testing.assert_close(q.double(), torch.from_numpy(plain_sinkhorn(scores.double().numpy())), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(12), atol=1e-5, rtol=0)  # each sample: an assignment
    # prototypes get ~B/K of the mass (exactly only in the limit of iterations)
    torch.testing.assert_close(sinkhorn(scores, iterations=200).sum(0), torch.full((7,), 12 / 7), atol=1e-4, rtol=0)
    # lightly leaves out the official `Q /= K`, a uniform factor the next column normalisation removes
    torch.testing.assert_close(q, lightly_sinkhorn(scores, iterations=3, epsilon=0.05), atol=1e-6, rtol=1e-5)
    assert not sinkhorn(scores.requires_grad_()).requires_grad


def test_swav_loss_matches_double_loop_and_lightly():
    from lightly.loss import SwaVLoss

    scores = random_scores(n_crops=5)  # 2 global + 3 local crops
    queue = [s[:4] for s in random_scores(n_crops=2, B=12, seed=1)]  # queued scores per assigned crop
    np_scores = [s.double().numpy() for s in scores]
    for q_t, q_np in [(None, None), (queue, [s.double().numpy() for s in queue])]:
        ours = swav_loss(scores, queue_scores=q_t)
        torch.testing.assert_close(ours.double(), torch.tensor(plain_loss(np_scores, queue=q_np), dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        # lightly: same normalisation (sum over pairs / (S - 1), mean over batch, mean over assigned crops)
        theirs = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(scores[:2], scores[2:], q_t)
        torch.testing.assert_close(ours, theirs.squeeze(), atol=1e-5, rtol=0)


def test_swav_loss_gradient_flows_to_predictions_only():
    scores = [s.clone().requires_grad_() for s in random_scores(n_crops=3)]
    swav_loss(scores).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    # crop 2 (local) is only predicted, never assigned; its gradient is the CE gradient w.r.t. fixed codes
    q0, q1 = sinkhorn(scores[0]), sinkhorn(scores[1])
    p2 = torch.softmax(scores[2].detach() / 0.1, 1)
    expected = ((p2 - q0) + (p2 - q1)) / 0.1 / 2 / 2 / scores[2].shape[0]  # 1/(S-1), 1/|A|, mean over batch
    torch.testing.assert_close(scores[2].grad, expected, atol=1e-5, rtol=1e-4)


# ---- the method -----------------------------------------------------------------------------------------
def tiny_swav(**kw) -> SwAV:
    kwargs = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0, proj_hidden=32,
                  proj_out=16, num_prototypes=10)
    return SwAV(**(kwargs | kw))


def multicrop_views(B: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 1, 16, 16, generator=g) for _ in range(2)] + [torch.randn(B, 1, 8, 8, generator=g) for _ in range(2)]


def test_queue_length_must_be_a_multiple_of_the_global_batch():
    model = tiny_swav(queue_length=10)
    views = multicrop_views(4)
    with pytest.raises(SSLError, match=r"queue_length \(10\) must be a multiple of the global batch .*model.queue_length"):
        model.loss(model.forward_views(views), views, torch.arange(4))


def test_queue_is_used_once_full_and_matches_explicit_sinkhorn():
    torch.manual_seed(0)
    model = tiny_swav(queue_length=8, queue_start_epoch=0).eval()  # eval: fixed BN statistics, same z every call
    batches = [multicrop_views(4, seed) for seed in (1, 2, 3)]
    with torch.no_grad():
        outs = []
        for views in batches:
            queued = [model.prototypes(q.bank) for q in model.queue]  # before this batch is enqueued
            outs.append(model.loss(model.forward_views(views), views, None))
        assert [float(o["queue_in_use"]) for o in outs] == [0.0, 0.0, 1.0]
        z = nn.functional.normalize(model.projector(torch.cat(model.forward_views(views))), dim=1)
        scores = model.prototypes(z).split(4)
        torch.testing.assert_close(outs[2]["loss"], swav_loss(scores, queue_scores=queued))
        assert not torch.allclose(outs[2]["loss"], swav_loss(scores))  # the queue changed the codes
        for q, t in zip(model.queue, (0, 1)):  # the queue holds the normalised projections of the global crops
            torch.testing.assert_close(q.bank[:4], z[4 * t:4 * (t + 1)])


class Recording(SwAV):
    """Records, per step, the prototypes' row norms as the loss sees them and their gradient after backward."""

    def loss(self, feats, views, index):
        self.norms.append(self.prototypes.weight.detach().norm(dim=1).clone())
        return super().loss(feats, views, index)

    def on_after_backward(self) -> None:
        super().on_after_backward()
        g = self.prototypes.weight.grad
        self.proto_grads.append(None if g is None else g.clone())
        self.weights.append(self.prototypes.weight.detach().clone())


def _data(**kw) -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         views="multicrop", num_local_crops=2,
                         dataset_options={"size": 32, "image_size": 16, "channels": 1}, **kw)


def test_prototypes_normalised_every_step_and_frozen_at_first():
    L.seed_everything(0)
    model = Recording(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0,
                      proj_hidden=32, proj_out=16, num_prototypes=10, freeze_prototypes_iters=2, lr=1.0,
                      weight_decay=1e-3, warmup_epochs=0)
    model.norms, model.proto_grads, model.weights = [], [], []
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)  # far from unit norm at the start
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, _data())
    assert len(model.norms) == 4
    for n in model.norms:
        torch.testing.assert_close(n, torch.ones(10))
    assert model.proto_grads[0] is None and model.proto_grads[1] is None  # frozen: global_step 0 and 1
    assert model.proto_grads[2] is not None and model.proto_grads[2].abs().sum() > 0
    torch.testing.assert_close(model.weights[1], model.weights[0])  # no update (not even weight decay) while frozen
    assert not torch.allclose(model.weights[3], model.weights[2])


def test_freeze_period_in_epochs(tmp_path):
    model = tiny_swav(freeze_prototypes_epochs=1.5)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, _data())  # 4 steps per epoch
    assert model.freeze_prototypes_steps() == 6


# ---- 2-process DDP: same codes, loss and gradients as one process on the global batch --------------------
B, QUEUE = 4, 16  # images per process; queue rows (a multiple of the global batch 2 x 4)


def build_ddp_swav() -> SwAV:
    torch.manual_seed(0)
    model = tiny_swav(backbone_kwargs={"norm": "none", "width": 8}, queue_length=QUEUE, queue_start_epoch=0)
    model.projector = mlp([model.backbone.num_features, 32, 16], norm="none")
    g = torch.Generator().manual_seed(5)
    for q in model.queue:  # a full queue, identical on every process
        q.bank.copy_(nn.functional.normalize(torch.randn(QUEUE, 16, generator=g), dim=1))
        q.filled.fill_(QUEUE)
    model.normalize_prototypes()
    return model


def global_scores() -> torch.Tensor:
    return random_scores(1, B=WORLD * B, K=10, seed=3)[0]


def scenario_sinkhorn(rank: int, world: int, out: Path) -> dict:
    return {"codes": sinkhorn(global_scores()[rank * B:(rank + 1) * B])}


def scenario_swav(rank: int, world: int, out: Path) -> dict:
    model = build_ddp_swav()
    views = [v[rank * B:(rank + 1) * B] for v in multicrop_views(WORLD * B)]
    loss = ddp_loss_backward(model, out / "swav_init.pt", views)
    return {"loss": loss, "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "queue": {k: v.clone() for k, v in model.queue.state_dict().items()}}


SCENARIOS = {"sinkhorn": scenario_sinkhorn, "swav": scenario_swav}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return spawn_results(tmp_path_factory, "ddp_swav", SCENARIOS, {"swav_init.pt": build_ddp_swav})


def test_ddp_sinkhorn_equals_single_process_on_global_batch(ddp):
    results = ddp("sinkhorn")
    codes = torch.cat([r["codes"] for r in results])
    torch.testing.assert_close(codes, sinkhorn(global_scores()), atol=1e-6, rtol=1e-5)
    local_only = torch.cat([sinkhorn(global_scores()[r * B:(r + 1) * B]) for r in range(WORLD)])
    assert not torch.allclose(codes, local_only, atol=1e-4)  # guard: the all-reduce matters


def test_ddp_swav_loss_and_grads_equal_single_process(ddp):
    results = ddp("swav")
    model = build_ddp_swav()
    model.load_state_dict(torch.load(ddp.out / "swav_init.pt", weights_only=True))
    views = multicrop_views(WORLD * B)
    out = model.loss(model.forward_views(views), views, None)
    assert float(out["queue_in_use"]) == 1.0
    out["loss"].backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), out["loss"].detach(), atol=1e-5, rtol=0)
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    assert ref_grads["prototypes.weight"].abs().max() > 1e-4
    for r, res in enumerate(results):
        for n, g in ref_grads.items():
            torch.testing.assert_close(res["grads"][n], g, atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"rank {r} {n}: {m}")
        for k, v in model.queue.state_dict().items():  # the enqueued global batch, in rank order
            torch.testing.assert_close(res["queue"][k], v, atol=1e-6, rtol=0, msg=k)


# ---- exact resume, with the queue in use and the prototypes frozen then trained ------------------------
def _resume_model() -> SwAV:
    L.seed_everything(0)
    return SwAV(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=10, proj_hidden=32,
                proj_out=16, num_prototypes=10, queue_length=16, queue_start_epoch=1, freeze_prototypes_iters=2,
                optimizer="lars", lr=0.5, warmup_epochs=1)


def _perturb(model: SwAV) -> None:  # restored state must not depend on the fresh model's
    for q in model.queue:
        q.bank.normal_()
    nn.init.normal_(model.prototypes.weight)


def test_resume_matches_uninterrupted(tmp_path):
    runs = check_resume_is_exact(_resume_model, _data, tmp_path, perturb=_perturb)
    assert float(runs.t_straight.callback_metrics["train/queue_in_use"]) == 1.0
    assert runs.t_first.global_step == 4
    assert runs.t_resumed.global_step == runs.t_straight.global_step == 8
    sd_a = runs.straight.state_dict()
    assert "queue.0.bank" in sd_a and "queue.1.ptr" in sd_a
    assert int(sd_a["queue.0.filled"]) == 16
