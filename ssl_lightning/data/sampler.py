"""A sampler that makes every augmentation reproducible: it yields ``(index, seed)`` pairs."""
from __future__ import annotations

from itertools import islice
from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler

from ssl_lightning import distributed


class SeededSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, sharded over processes, a no-op split in one process)
    that pairs each index with a seed derived from ``(seed, epoch, index)``.

    The dataset seeds the sample's augmentation with it, so the views of a sample depend neither on
    the number of loader workers nor on whether the run was resumed. Being a DistributedSampler,
    Lightning leaves it in place under DDP and calls ``set_epoch``.

    Resuming: ``epoch`` is the epoch of the first iteration (Lightning calls ``set_epoch`` only after it
    has created the first loader iterator, and loader workers draw their first indices right then) and
    ``skip`` drops the first ``skip`` indices of that epoch, the samples the resumed run has already
    trained on; later epochs are whole. ``len()`` stays the full epoch: Lightning counts the trained
    batches of the resumed epoch itself.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True, epoch: int = 0, skip: int = 0) -> None:
        super().__init__(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                         shuffle=shuffle, seed=seed, drop_last=True)
        self.set_epoch(epoch)
        self.resume_epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip = self.skip if self.epoch == self.resume_epoch else 0
        for index in islice(super().__iter__(), skip, None):
            yield index, sample_seed(self.seed, self.epoch, index)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_000_019 + index * 7_919) % (2**63 - 1)
