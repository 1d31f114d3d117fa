"""Uniform sampling over clusters (DeepCluster's ``UnifLabelSampler``, facebookresearch/deepcluster ``util.py``):
an epoch of N images drawn so that every non-empty cluster is seen equally often."""
from __future__ import annotations

from itertools import islice
from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset

from ssl_lightning.data.sampler import SeededSampler, sample_seed


def uniform_over_clusters(labels: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` dataset indices, shuffled, each non-empty cluster of ``labels`` (n,) drawn ``num // m`` or
    ``num // m + 1`` times (m non-empty clusters; which clusters get the extra one is random). A cluster's images
    are drawn without replacement when it has enough of them, with replacement otherwise (the official rule);
    empty clusters are skipped. The official sampler draws ``num // m + 1`` per cluster and truncates the shuffled
    list to ``num``, so its counts vary by a few; here they differ by at most one."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)  # the images, grouped by cluster
    clusters, sizes = torch.unique_consecutive(labels[order], return_counts=True)
    if clusters.numel() == 0 or bool((clusters < 0).any()):
        raise ValueError("uniform_over_clusters needs a cluster label >= 0 for every image")
    m = clusters.numel()
    counts = torch.full((m,), num // m, dtype=torch.long)
    counts[torch.randperm(m, generator=generator)[:num % m]] += 1
    picks = []
    for members, count in zip(torch.split(order, sizes.tolist()), counts.tolist()):
        if members.numel() >= count:
            picks.append(members[torch.randperm(members.numel(), generator=generator)[:count]])
        else:
            picks.append(members[torch.randint(members.numel(), (count,), generator=generator)])
    picked = torch.cat(picks)
    return picked[torch.randperm(num, generator=generator)]


class ClusterUniformSampler(SeededSampler):
    """The training sampler of a method that clusters every epoch: epoch e's order is
    :func:`uniform_over_clusters` of ``labels_for(e)`` (the pseudo-labels made for that epoch, asked for when the
    epoch's iteration starts), seeded by ``(seed, e)``, with the dataset's size N; sharded over processes and
    resumable as :class:`SeededSampler` (``epoch`` / ``skip``). Each position gets its own augmentation seed, so an
    image drawn twice in an epoch gets two different views."""

    def __init__(self, dataset: Dataset, labels_for: Callable[[int], torch.Tensor], seed: int = 0, epoch: int = 0,
                 skip: int = 0) -> None:
        super().__init__(dataset, seed=seed, epoch=epoch, skip=skip)
        self.labels_for = labels_for

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = uniform_over_clusters(self.labels_for(epoch), len(self.dataset), g)
        positions = range(self.rank, self.total_size, self.num_replicas)  # DistributedSampler's drop_last split
        skip = self.skip if epoch == self.resume_epoch else 0
        n = len(self.dataset)
        for pos in islice(positions, skip, None):
            index = int(order[pos])
            yield index, sample_seed(self.seed, epoch, pos * n + index)
