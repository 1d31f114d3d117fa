"""SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning import distributed
from ssl_lightning.heads import mlp
from ssl_lightning.losses.joint_embedding.swav import swav_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules import MemoryBank
from ssl_lightning.registry import SSLError


@METHODS.register("swav")
class SwAV(SSLMethod):
    """Swapped prediction of online cluster codes across multi-crop views (follows facebookresearch/swav main_swav.py).

    ``z = normalize(projector(f))``, scores ``z . C`` against L2-normalised prototypes ``C`` (no bias);
    codes ``q_t = Sinkhorn(exp(z_t . C / eps))`` on the global crops t (equipartition over the global
    batch, plus the queue once active); ``L = 1/|A| sum_t 1/(S-1) sum_{s != t} -sum_k q_tk log softmax(z_s . C / T)_k``.

    Args:
        num_prototypes: K (3000). proj_hidden, proj_out: projector widths (2048 -> 128).
        temperature: T of the softmax (0.1). epsilon, sinkhorn_iterations: Sinkhorn's eps (0.05) and iterations (3).
        crops_for_assign: crops whose codes are computed (the two global crops).
        queue_length: features kept per assigned crop (0 = no queue; 3840 at batch 256); a multiple of the
            global batch. Filled every step, used from ``queue_start_epoch`` (15 at batch 256) on.
        freeze_prototypes_epochs / freeze_prototypes_iters: prototypes get no gradient for this many epochs
            (1 in the paper) or, if given, iterations.
    """

    def __init__(self, num_prototypes: int = 3000, proj_hidden: int = 2048, proj_out: int = 128,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 crops_for_assign: tuple[int, ...] = (0, 1), queue_length: int = 0, queue_start_epoch: int = 15,
                 freeze_prototypes_epochs: float = 1.0, freeze_prototypes_iters: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projector = mlp([self.backbone.num_features, proj_hidden, proj_out])
        self.prototypes = nn.Linear(proj_out, num_prototypes, bias=False)
        self.queue = nn.ModuleList(MemoryBank(queue_length, proj_out, init="zeros") for _ in crops_for_assign) \
            if queue_length > 0 else None

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        hp, bs = self.hparams, feats[0].shape[0]
        with torch.autocast(self.device.type, enabled=False):  # head in float32: exp(scores / eps) is sensitive
            z = F.normalize(self.projector(torch.cat(feats).float()), dim=1)  # one pass over all crops, as in the paper
            scores = self.prototypes(z).split(bs)
        z = z.detach().split(bs)
        queue_scores = None
        if self.queue is not None:
            self._check_queue(bs)
            if self.current_epoch >= hp.queue_start_epoch and all(q.is_full for q in self.queue):
                world, rank = distributed.world_size(), distributed.rank()
                with torch.no_grad():  # this process's shard: over all processes, every queued row once
                    queue_scores = [self.prototypes(q.bank.chunk(world)[rank]) for q in self.queue]
        loss = swav_loss(scores, hp.crops_for_assign, hp.temperature, hp.epsilon, hp.sinkhorn_iterations, queue_scores)
        if self.queue is not None:
            for q, t in zip(self.queue, hp.crops_for_assign):
                q.enqueue(z[t])  # after the codes: a batch never meets itself in the queue
        return {"loss": loss, "queue_in_use": torch.tensor(float(queue_scores is not None), device=loss.device)}

    def _check_queue(self, bs: int) -> None:
        global_bs = bs * distributed.world_size()
        if self.hparams.queue_length % global_bs:
            raise SSLError(f"SwAV's queue_length ({self.hparams.queue_length}) must be a multiple of the global batch "
                           f"({bs} per process x {distributed.world_size()} processes = {global_bs}); "
                           f"set model.queue_length to e.g. {max(1, round(self.hparams.queue_length / global_bs)) * global_bs}.")

    # ---- prototypes: L2-normalised before every step, frozen at the start ----------------------------
    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.normalize_prototypes()

    def freeze_prototypes_steps(self) -> int:
        if self.hparams.freeze_prototypes_iters is not None:
            return self.hparams.freeze_prototypes_iters
        per_epoch = max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)
        return int(round(self.hparams.freeze_prototypes_epochs * per_epoch))

    def on_after_backward(self) -> None:
        if self.trainer.global_step < self.freeze_prototypes_steps():
            self.prototypes.weight.grad = None  # as the official code: no update at all (no weight decay, no momentum)
