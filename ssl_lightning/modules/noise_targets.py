"""Noise As Targets' per-dataset state: the fixed targets and the current image-to-target assignment."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.losses.instance.nat import nat_assign
from ssl_lightning.modules.indexed_bank import gather_rows, last_occurrence


class NoiseTargets(nn.Module):
    """``num_samples`` fixed targets uniform on the unit sphere of ``dim`` dimensions (seeded: identical on every
    process) and the assignment, a permutation: image i regresses onto ``targets[assignment[i]]`` (initially
    target i). Both are buffers, so saved in checkpoints (Bojanowski & Joulin 2017).

    :meth:`reassign` re-solves the assignment among the batch's own current targets (Hungarian algorithm, so the
    assignment stays a permutation of all targets). Under DDP the features and indices of every process are
    gathered in rank order and the same problem is solved on every process: each holds the assignment that one
    process computes on the global batch.
    """

    def __init__(self, num_samples: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        if num_samples <= 0 or dim <= 0:
            raise ValueError(f"NoiseTargets needs num_samples > 0 and dim > 0, got {num_samples}, {dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("targets", F.normalize(torch.randn(num_samples, dim, generator=g), dim=1))
        self.register_buffer("assignment", torch.arange(num_samples))

    @property
    def num_samples(self) -> int:
        return self.targets.shape[0]

    def current(self, index: torch.Tensor) -> torch.Tensor:
        """The targets (B, dim) currently assigned to images ``index`` (B,)."""
        return self.targets[self.assignment[index]]

    @torch.no_grad()
    def reassign(self, index: torch.Tensor, features: torch.Tensor, gather: bool = True) -> None:
        """Hungarian re-assignment of the batch's images ``index`` (B,) with unit-norm ``features`` (B, dim) among
        their own current targets. A sample present twice takes part once (with its last row's features)."""
        index, features = gather_rows(index, features, gather)
        index = index.to(self.assignment.device)
        keep = last_occurrence(index)
        index, features = index[keep], features[keep.to(features.device)]
        own = self.assignment[index]
        perm = nat_assign(features.to(self.targets), self.targets[own]).to(own.device)
        self.assignment[index] = own[perm]
