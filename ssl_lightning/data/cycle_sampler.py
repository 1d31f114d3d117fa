"""A sampler for one stream of a semi-supervised batch (labelled or unlabelled): a fixed number of samples per
epoch, drawn from as many fresh seeded permutations of the dataset as that takes, each paired with the seed
of its augmentation.

The labelled set is much smaller than the unlabelled one, so its stream cycles: permutation 0, then 1, ...,
each a new shuffle, each sample with a new augmentation seed per pass (a ``DataLoader`` restarted by
``CombinedLoader`` would repeat the same order and views within an epoch). Everything is a function of
``(seed, stream, epoch, pass, index)``: views do not depend on the number of loader workers, a run resumed from
any checkpoint sees the same samples (mid-epoch: ``skip`` drops what the interrupted run trained on), and the
``W`` processes of a DDP run together see at each step exactly the samples (and views) that one process with ``W``
times the batch sees.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from ssl_lightning import distributed

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective mix of the bits."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stream_key(*parts: int) -> int:
    """A 63-bit key mixed from non-negative ints (seed, stream, epoch, pass...)."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = _splitmix64(h ^ np.array([p], dtype=np.uint64))
    return int(h[0] >> np.uint64(1))


def sample_seeds(key: int, indices: np.ndarray) -> np.ndarray:
    """The augmentation seed (63 bits) of each index under ``key``."""
    mixed = _splitmix64(np.full(len(indices), key, dtype=np.uint64) ^ _splitmix64(indices.astype(np.uint64)))
    return (mixed >> np.uint64(1)).astype(np.int64)


class CyclingSampler(DistributedSampler):
    """Yields ``samples_per_replica`` ``(index, seed)`` pairs per epoch on each of ``num_replicas`` processes.

    The epoch's global sequence is the concatenation of seeded permutations ``p = 0, 1, ...`` of the dataset,
    cut to ``samples_per_replica x num_replicas``; process ``r`` takes every ``num_replicas``-th element from
    ``r`` (DistributedSampler's interleaving), so a step's batches of all processes together are one
    contiguous run of the global sequence. ``stream`` separates the labelled and the unlabelled streams (an
    image in both gets independent views). A DistributedSampler, so Lightning leaves it in place under DDP
    and calls :meth:`set_epoch` each epoch.

    Resuming (as :class:`~ssl_lightning.data.sampler.SeededSampler`): ``epoch`` is the epoch of the first iteration
    and ``skip`` drops the first ``skip`` pairs (per process) of that epoch; later epochs are whole. ``len()`` stays
    the full epoch: Lightning counts the batches of the resumed epoch itself.
    """

    def __init__(self, dataset: Dataset, samples_per_replica: int, seed: int = 0, stream: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, epoch: int = 0, skip: int = 0) -> None:
        num_replicas = distributed.world_size() if num_replicas is None else num_replicas
        rank = distributed.rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if len(dataset) == 0:
            raise ValueError("CyclingSampler needs a non-empty dataset")
        self.stream = stream
        self.num_samples = int(samples_per_replica)
        self.total_size = self.num_samples * self.num_replicas
        self.set_epoch(epoch)
        self.resume_epoch, self.skip = epoch, skip

    def global_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's global ``(indices, seeds)``, ``total_size`` of each."""
        n = len(self.dataset)
        indices, seeds = [], []
        for p in range(math.ceil(self.total_size / n)):
            key = stream_key(self.seed, self.stream, self.epoch, p)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(key)).numpy()
            indices.append(perm)
            seeds.append(sample_seeds(key, perm))
        return np.concatenate(indices)[: self.total_size], np.concatenate(seeds)[: self.total_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.global_keys()
        r, w = self.rank, self.num_replicas
        skip = self.skip if self.epoch == self.resume_epoch else 0
        return iter(zip(indices[r::w][skip:].tolist(), seeds[r::w][skip:].tolist()))

    def __len__(self) -> int:
        return self.num_samples
