"""MoCo v1 (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020)
and MoCo v2 (Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020).

Follows facebookresearch/moco moco/builder.py (commit 7397dfe): asymmetric, query = view 0, key = view 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_lightning import distributed
from ssl_lightning.heads import mlp
from ssl_lightning.losses.metric.infonce import moco_infonce
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules import MemoryBank, momentum_copy
from ssl_lightning.registry import SSLError


@METHODS.register("moco_v2")
class MoCoV2(SSLMethod):
    """Query encoder f_q (backbone + head), key encoder f_k = EMA of f_q, a FIFO queue of K keys:

        q = f_q(x_q),  k+ = f_k(x_k) (no gradient),  L = -log exp(q.k+/T) / sum_{k in {k+} U queue} exp(q.k/T)

    then the global batch's keys replace the oldest K-queue entries (after the loss). f_k's
    parameters follow ``theta_k <- m theta_k + (1 - m) theta_q`` with a constant m.

    Shuffle-BN (the paper's guard against BN leaking which key is the positive): under DDP the
    key batch is shuffled across processes before f_k and unshuffled after; on a single process the
    key encoder's BatchNorm2d layers normalise ``split_bn_groups`` sub-batches separately (the MoCo
    CIFAR demo's SplitBatchNorm). Both are off with ``shuffle_bn: false``.

    Args:
        queue_size: K, number of negative keys (65536); a multiple of the global batch.
        temperature: T (0.07 for v1, 0.2 for v2).
        mlp_head: v2's 2-layer head ``Linear-ReLU-Linear`` (hidden = backbone width, no BN); v1's is one Linear.
        proj_out: feature dimension (128). proj_hidden: the MLP head's hidden width (None = backbone width).
        momentum_base: m (0.999); momentum_final: None = momentum_base (constant m, as in the paper).
        shuffle_bn, split_bn_groups: see above (default on, 8 groups as in the CIFAR demo).
    """

    concat_views = False  # the query encoder sees the query view alone (its own BN statistics)

    def __init__(self, queue_size: int = 65536, temperature: float = 0.2, mlp_head: bool = True,
                 proj_out: int = 128, proj_hidden: int | None = None, momentum_base: float = 0.999,
                 momentum_final: float | None = None, shuffle_bn: bool = True, split_bn_groups: int = 8,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if momentum_final is None:
            self.hparams.momentum_final = momentum_base  # MoCo's m is constant
        width = self.backbone.num_features
        self.head = mlp([width, proj_hidden or width, proj_out], norm="none") if mlp_head else mlp([width, proj_out])
        self.key_backbone = momentum_copy(self.backbone)
        self.key_head = momentum_copy(self.head)
        if shuffle_bn and split_bn_groups > 1:
            split_batch_norm(self.key_backbone, split_bn_groups)
        self.queue = MemoryBank(queue_size, proj_out)

    def momentum_pairs(self):
        return [(self.backbone, self.key_backbone), (self.head, self.key_head)]

    def forward_views(self, views, network=None):
        if network is None:  # the base's query pass: only the query view needs the query encoder
            views = views[:1]
        return super().forward_views(views, network)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        self._check_queue_size(views[1].shape[0])
        q = self.head(feats[0])
        k = F.normalize(self.keys(views[1]), dim=1)
        loss = moco_infonce(q, k, self.queue.bank.clone(), self.hparams.temperature)
        self.queue.enqueue(k)  # after the loss; gathers the keys of all processes (rank order)
        return loss

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """k = f_k(x), with the batch shuffled across processes around f_k under DDP (shuffle-BN)."""
        if self.hparams.shuffle_bn and distributed.world_size() > 1:
            x, unshuffle = batch_shuffle_ddp(x)
            return batch_unshuffle_ddp(self.key_head(self.key_backbone(x)), unshuffle)
        return self.key_head(self.key_backbone(x))

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # the cross-process shuffle does shuffle-BN's job (paper's multi-GPU recipe)
            for m in self.key_backbone.modules():
                if isinstance(m, SplitBatchNorm2d):
                    m.groups = 1

    def _check_queue_size(self, per_process: int) -> None:
        world = distributed.world_size()
        batch = per_process * world
        if self.hparams.queue_size % batch:
            fix = -(-self.hparams.queue_size // batch) * batch
            raise SSLError(
                f"MoCo's queue size K={self.hparams.queue_size} is not a multiple of the global batch {batch} "
                f"({per_process} per process x {world} processes), so the queue would be overwritten mid-batch. "
                f"Set model.init_args.queue_size to a multiple of {batch} (e.g. {fix}) or change data.batch_size.")


@METHODS.register("moco_v1")
class MoCoV1(MoCoV2):
    """MoCo v1: linear head (128-d) and T = 0.07; everything else as :class:`MoCoV2`."""

    def __init__(self, temperature: float = 0.07, mlp_head: bool = False, **kwargs) -> None:
        super().__init__(temperature=temperature, mlp_head=mlp_head, **kwargs)


# ---- shuffle-BN ---------------------------------------------------------------------------------------
class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each of ``groups`` sub-batches with its own statistics
    (single-device shuffle-BN, as in the MoCo CIFAR demo); the running statistics get the mean of the
    sub-batches' updates. Same parameters and buffers as BatchNorm2d; evaluation is unchanged."""

    def __init__(self, num_features: int, groups: int = 8, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = min(self.groups, x.shape[0])
        if not self.training or groups <= 1 or self.running_mean is None:
            return super().forward(x)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
        outs, means, variances = [], [], []
        for chunk in x.tensor_split(groups):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, momentum, self.eps))
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(outs)


def split_batch_norm(module: nn.Module, groups: int) -> nn.Module:
    """In place: every BatchNorm2d of ``module`` becomes a :class:`SplitBatchNorm2d` (same state)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, groups, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            split.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(module, name, split)
        else:
            split_batch_norm(child, groups)
    return module


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's slice of a random permutation of the global batch (rank 0's permutation is
    broadcast), and the inverse permutation for :func:`batch_unshuffle_ddp` (moco/builder.py)."""
    x_all = distributed.gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    n, r = x.shape[0], distributed.rank()
    return x_all[perm[r * n:(r + 1) * n]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle_ddp(y: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """The rows of the global ``y`` that belong to this process's original samples."""
    y_all = distributed.gather(y)
    n, r = y.shape[0], distributed.rank()
    return y_all[unshuffle[r * n:(r + 1) * n]]
