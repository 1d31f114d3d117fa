"""DeepCluster's clustering of a whole training set (Caron et al. 2018; facebookresearch/deepcluster
``clustering.py``): PCA with whitening -> L2 normalisation -> k-means, with faiss as the official code, and the
per-image pseudo-labels it produces, kept as state (:class:`ClusterAssignments`).

faiss runs on the host in float32. Its k-means handles empty clusters itself: during training an empty
cluster's centroid is replaced by a slightly perturbed copy of a large cluster's (the large one is split), so
every centroid has points at each iteration; the final nearest-centroid assignment can still, rarely, leave a
cluster empty, and the uniform sampler (:mod:`ssl_lightning.data.cluster_sampler`) skips such clusters.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ssl_lightning.registry import SSLError


def check_clustering(num_samples: int, feature_dim: int, num_clusters: int, pca_dim: int) -> None:
    """Errors naming the fix for settings the pipeline cannot run with."""
    if num_clusters < 2:
        raise SSLError(f"num_clusters={num_clusters}: k-means needs at least 2 clusters (DeepCluster: 10000 on ImageNet)")
    if num_clusters > num_samples:
        raise SSLError(f"num_clusters={num_clusters} is more than the {num_samples} training images: lower "
                       "model.init_args.num_clusters (about 10x the number of classes is usual) or use more images")
    if pca_dim < 0 or pca_dim > feature_dim:
        raise SSLError(f"pca_dim={pca_dim} is not between 0 (no PCA) and the {feature_dim}-d features being "
                       "clustered: lower model.init_args.pca_dim (256 in the paper, for 4096-d features)")
    if pca_dim > num_samples:
        raise SSLError(f"pca_dim={pca_dim} needs at least as many images, got {num_samples}: lower "
                       "model.init_args.pca_dim")


def pca_whiten_l2(features: torch.Tensor, pca_dim: int) -> np.ndarray:
    """``(n, d)`` features -> ``(n, pca_dim)`` float32: PCA to ``pca_dim`` components, each scaled by
    eigenvalue^-1/2 (whitening, faiss ``PCAMatrix(d, pca_dim, eigen_power=-0.5)``), then rows L2-normalised
    (the official ``preprocess_features``). ``pca_dim=0``: L2 normalisation only."""
    import faiss

    x = np.ascontiguousarray(features.detach().float().cpu().numpy())
    if pca_dim:
        pca = faiss.PCAMatrix(x.shape[1], pca_dim, -0.5)
        pca.train(x)
        x = pca.apply_py(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.isfinite(x).all() or (norms == 0).any():
        raise SSLError(f"PCA-whitening to {pca_dim} dimensions gave non-finite or zero features (components with "
                       "zero variance, e.g. dead ReLU channels): lower model.init_args.pca_dim")
    return (x / norms).astype(np.float32)


def kmeans(x: np.ndarray, num_clusters: int, niter: int = 20, seed: int = 0) -> tuple[torch.Tensor, float]:
    """faiss k-means of ``(n, d)`` float32 rows: ``(labels (n,) long, final objective)``. As the official
    ``run_kmeans``: ``niter`` 20, no subsampling of the training points (``max_points_per_centroid`` 10^7),
    labels = nearest centroid (exact L2 search)."""
    import faiss

    n, d = x.shape
    clus = faiss.Clustering(d, num_clusters)
    clus.seed = int(seed)
    clus.niter = int(niter)
    clus.max_points_per_centroid = 10_000_000
    index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    _, nearest = index.search(x, 1)
    stats = clus.iteration_stats
    return torch.from_numpy(nearest[:, 0].astype(np.int64)), float(stats.at(stats.size() - 1).obj)


def cluster(features: torch.Tensor, num_clusters: int, pca_dim: int, niter: int = 20,
            seed: int = 0) -> tuple[torch.Tensor, float]:
    """The whole pipeline on ``(n, d)`` features: PCA-whitening, L2, k-means -> ``(labels (n,), objective)``."""
    check_clustering(features.shape[0], features.shape[1], num_clusters, pca_dim)
    return kmeans(pca_whiten_l2(features, pca_dim), num_clusters, niter, seed)


class ClusterAssignments(nn.Module):
    """Per-image pseudo-labels of the current epoch, the previous epoch's, the epoch they were made for (-1:
    none yet) and the NMI between the two (the paper's stability curve; -1 before there are two: the state stays
    finite, as checkpoints require). Buffers: saved in checkpoints, so a
    resumed run keeps the epoch's labels (mid-epoch) or scores the next clustering against them."""

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.register_buffer("labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("previous", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("nmi_prev", torch.full((), -1.0))

    @property
    def num_samples(self) -> int:
        return self.labels.shape[0]

    @torch.no_grad()
    def update(self, labels: torch.Tensor, epoch: int) -> None:
        """The new epoch's labels; the old ones become ``previous`` and are scored against them."""
        from sklearn.metrics import normalized_mutual_info_score

        labels = labels.to(self.labels.device)
        self.previous.copy_(self.labels)
        self.labels.copy_(labels)
        self.epoch.fill_(epoch)
        nmi = -1.0 if bool((self.previous < 0).any()) else \
            normalized_mutual_info_score(self.previous.cpu().numpy(), self.labels.cpu().numpy())
        self.nmi_prev.fill_(nmi)
