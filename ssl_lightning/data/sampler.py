"""A sampler that makes every augmentation reproducible: it yields ``(index, seed)`` pairs."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler

from ssl_lightning import distributed


class SeededSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, sharded over processes, a no-op split in one process)
    that pairs each index with a seed derived from ``(seed, epoch, index)``.

    The dataset seeds the sample's augmentation with it, so the views of a sample depend neither on
    the number of loader workers nor on whether the run was resumed from an end-of-epoch checkpoint.
    Being a DistributedSampler, Lightning leaves it in place under DDP and calls ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                         shuffle=shuffle, seed=seed, drop_last=True)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in super().__iter__():
            yield index, sample_seed(self.seed, self.epoch, index)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_000_019 + index * 7_919) % (2**63 - 1)
