"""The epoch-level clustering step of methods that train on pseudo-labels re-made every epoch (DeepCluster).

Before each training epoch (as the official ``main.py``: cluster, then train the epoch on those labels) the
whole training set is embedded in eval mode with the un-augmented evaluation transform (centre crops), the
features are clustered (:func:`ssl_lightning.modules.kmeans.cluster`: PCA-whitening, L2, faiss k-means) and the
per-image labels stored (:class:`~ssl_lightning.modules.kmeans.ClusterAssignments`, in checkpoints). Under DDP each
process embeds its contiguous shard, the features are gathered in rank order, clustered once on rank 0, and the
labels broadcast. The epoch's training order is uniform over the non-empty clusters
(:class:`~ssl_lightning.data.cluster_sampler.ClusterUniformSampler`, which the datamodule takes from
``train_sampler``).

When: Lightning creates an epoch's loader iterator -- and loader workers start drawing indices -- before
``on_train_epoch_start`` for the first epoch of a fit (inside ``configure_optimizers``, after the weights but
before the optimizer state are restored) and after it for the others. So the labels are made on demand, when the
sampler starts an epoch or in ``on_train_epoch_start``, whichever comes first; ``assignments.epoch`` says which
epoch they are for, so a run resumed mid-epoch keeps the checkpoint's. The optimizer state of the parameters
re-initialised with the clusters (:meth:`fresh_parameters`) is dropped in the next ``on_train_epoch_start`` or
``on_train_batch_start``, after the checkpoint's optimizer state is restored. Nothing here draws from the global
RNG (resume exactness).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_lightning import distributed
from ssl_lightning.data.cluster_sampler import ClusterUniformSampler
from ssl_lightning.methods.instance.per_sample import PerSampleState
from ssl_lightning.modules.kmeans import ClusterAssignments, check_clustering, cluster
from ssl_lightning.registry import SSLError


@torch.no_grad()
def gather_dataset_features(embed, dataset: Dataset, batch_size: int, device: torch.device,
                            num_workers: int = 0) -> torch.Tensor:
    """``embed`` over the whole ``dataset`` of ``(image, label)`` -> ``(n, d)`` float32 features in dataset order.
    Under DDP process r embeds images ``[r*c, (r+1)*c)`` (c = ceil(n / world)) and the shards are gathered in rank
    order, so every process returns what one process computes on the whole dataset."""
    world, rank, n = distributed.world_size(), distributed.rank(), len(dataset)
    per = math.ceil(n / world)
    shard = Subset(dataset, range(min(n, rank * per), min(n, (rank + 1) * per)))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    parts = [embed(images.to(device)).float() for images, _ in loader]
    if not parts:  # an empty shard (fewer images than processes): the width from one image
        parts = [embed(dataset[0][0][None].to(device)).float()[:0]]
    local = torch.cat(parts)
    if world == 1:
        return local
    padded = torch.cat([local, local.new_zeros(per - local.shape[0], local.shape[1])])
    rows = distributed.gather(padded)
    return torch.cat([rows[r * per:r * per + max(0, min(n, (r + 1) * per) - r * per)] for r in range(world)])


def cluster_on_rank_zero(features: torch.Tensor, num_clusters: int, pca_dim: int, niter: int,
                         seed: int) -> tuple[torch.Tensor, float]:
    """:func:`~ssl_lightning.modules.kmeans.cluster` on process 0, its labels and objective broadcast to all."""
    if distributed.world_size() == 1:
        return cluster(features, num_clusters, pca_dim, niter, seed)
    out = torch.zeros(features.shape[0] + 1, dtype=torch.float64, device=features.device)
    if distributed.rank() == 0:
        labels, objective = cluster(features, num_clusters, pca_dim, niter, seed)
        out[:-1], out[-1] = labels.to(out), objective
    dist.broadcast(out, src=0)
    return out[:-1].long().cpu(), float(out[-1])


class EpochClustering(PerSampleState):
    """Mixin (before :class:`~ssl_lightning.methods.SSLMethod`) for methods trained on per-epoch cluster labels.
    The method's hyperparameters name ``num_clusters``, ``pca_dim``, ``kmeans_iters``, ``cluster_seed`` and
    ``num_samples``; it may override :meth:`cluster_features` (what is clustered), :meth:`on_new_clusters` (e.g.
    re-initialise its classifier) and :meth:`fresh_parameters` (whose optimizer state each epoch starts without).
    ``self.assignments.labels`` are the current epoch's pseudo-labels."""

    state_name = "cluster assignments"

    def _build_state(self, n: int) -> None:
        hp = self.hparams
        check_clustering(n, self.cluster_dim, hp.num_clusters, hp.pca_dim)
        self.assignments = ClusterAssignments(n).to(self.device)
        self._reset_optimizer_pending = False
        self._cluster_log: dict[str, float] = {}

    # ---- what a method may override -----------------------------------------------------------------------
    @property
    def cluster_dim(self) -> int:
        """Width of :meth:`cluster_features` (default: the backbone's)."""
        return self.backbone.num_features

    def cluster_features(self, images: torch.Tensor) -> torch.Tensor:
        """The features that are clustered (default: the backbone's)."""
        return self.backbone(images)

    def on_new_clusters(self, epoch: int) -> None:
        """Called after the labels of ``epoch`` were made."""

    def fresh_parameters(self) -> list[nn.Parameter]:
        """Parameters whose optimizer state is dropped when new clusters are made."""
        return []

    # ---- the step ---------------------------------------------------------------------------------------------
    def train_sampler(self, dataset: Dataset, seed: int, epoch: int, skip: int) -> ClusterUniformSampler:
        """The datamodule's training sampler: uniform over this epoch's non-empty clusters."""
        return ClusterUniformSampler(dataset, self.labels_for_epoch, seed=seed, epoch=epoch, skip=skip)

    def labels_for_epoch(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s pseudo-labels (n,), clustering now if they are not made yet."""
        self.require_state()
        if int(self.assignments.epoch) != epoch:
            self.cluster_epoch(epoch)
        return self.assignments.labels.cpu()

    @torch.no_grad()
    def cluster_epoch(self, epoch: int) -> None:
        hp = self.hparams
        dm = self.trainer.datamodule
        if not hasattr(dm, "pretrain_eval_set"):
            raise SSLError(f"{type(self).__name__} clusters the whole training set every epoch and reads it from the "
                           "datamodule: train with an SSLDataModule (trainer.fit(model, datamodule=...))")
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            feats = gather_dataset_features(self.cluster_features, dm.pretrain_eval_set(), dm.eval_batch_size,
                                            self.device, dm.num_workers)
        finally:
            for m, training in modes.items():
                m.training = training
        seed = (hp.cluster_seed * 1_000_003 + epoch) % 2**31  # a new k-means seed each epoch, as the official code
        labels, objective = cluster_on_rank_zero(feats, hp.num_clusters, hp.pca_dim, hp.kmeans_iters, seed)
        self.assignments.update(labels, epoch)
        self._cluster_log = {"nmi_prev": float(self.assignments.nmi_prev), "kmeans_objective": objective,
                             "clusters_nonempty": float(torch.unique(labels).numel())}
        self.on_new_clusters(epoch)
        self._reset_optimizer_pending = True

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # type: ignore[misc]
        self.labels_for_epoch(self.trainer.current_epoch)
        self._after_clustering()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
        self._after_clustering()  # a fit resumed from a checkpoint of an epoch's last step skips on_train_epoch_start

    def _after_clustering(self) -> None:
        """Once after new clusters, in a training hook (the checkpoint's optimizer state is restored by then): drop
        the optimizer state of :meth:`fresh_parameters` and log the clustering."""
        if self._reset_optimizer_pending:
            for optimizer in self.trainer.optimizers:
                for p in self.fresh_parameters():
                    optimizer.state.pop(p, None)
            self._reset_optimizer_pending = False
        for name, value in self._cluster_log.items():
            if value >= 0:  # nmi_prev: -1 at the first clustering
                self.log(f"train/{name}", value, on_step=False, on_epoch=True, sync_dist=True)  # equal on every process
        self._cluster_log = {}
