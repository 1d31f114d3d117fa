"""Per-dataset state addressed by sample index: NPID's memory bank of all n images, and the helper that makes
writes from several processes resolve like one process on the global batch."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning import distributed


def last_occurrence(index: torch.Tensor) -> torch.Tensor:
    """Positions in ``index`` of the last occurrence of each distinct value (ascending by value).

    Writing ``table[index[pos]] = values[pos]`` then resolves duplicates deterministically: the last row wins, as
    a sequential loop over the batch would (PyTorch's ``table[index] = values`` leaves the winner unspecified)."""
    order = torch.sort(index, stable=True)
    last = torch.ones_like(index, dtype=torch.bool)
    last[:-1] = order.values[1:] != order.values[:-1]
    return order.indices[last]


def gather_rows(index: torch.Tensor, values: torch.Tensor, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, values)`` of every process concatenated in rank order (a no-op in one process), so that each
    process applies the same writes as one process on the global batch."""
    if gather:
        index, values = distributed.gather(index), distributed.gather(values.detach())
    return index, values.detach()


class IndexedBank(nn.Module):
    """A memory bank of ``num_samples`` rows of width ``dim``, row i for training image i (NPID; Wu et al. 2018,
    lemniscate.pytorch ``lib/NCEAverage.py`` / ``LinearAverage.py``); a buffer, so saved in checkpoints.

    * Initial rows uniform in ``[-1/sqrt(dim/3), 1/sqrt(dim/3)]``, as lemniscate: not normalised, but of expected
      squared norm 1 (each coordinate has variance 1/dim). ``seed`` makes it identical on every process.
    * :meth:`update` (after the loss): ``m_i <- momentum * m_i + (1 - momentum) * v_i``, then renormalised, for
      the batch's own rows only. Indices and values of every process are gathered in rank order first; a sample
      present twice keeps its last row's update (from the row's old value), so every process holds the same
      bank as one process on the global batch. A non-finite row is not written (the sample keeps its old row).
    """

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if num_samples <= 0 or dim <= 0:
            raise ValueError(f"IndexedBank needs num_samples > 0 and dim > 0, got {num_samples}, {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"IndexedBank needs a momentum in [0, 1), got {momentum}")
        self.momentum = momentum
        stdv = 1.0 / math.sqrt(dim / 3)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("bank", torch.rand(num_samples, dim, generator=g).mul_(2 * stdv).sub_(stdv))

    @property
    def num_samples(self) -> int:
        return self.bank.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (any shape of indices), a copy: later updates leave them unchanged."""
        return self.bank[index]

    @torch.no_grad()
    def update(self, index: torch.Tensor, values: torch.Tensor, gather: bool = True) -> None:
        """Momentum update of rows ``index`` (B,) with ``values`` (B, dim), then renormalised (see the class)."""
        index, values = gather_rows(index, values, gather)
        index = index.to(self.bank.device)  # in range: the methods check num_samples against the data in setup
        keep = last_occurrence(index)
        index, values = index[keep], values[keep.to(values.device)].to(self.bank)
        old = self.bank[index]
        mixed = F.normalize(old * self.momentum + values * (1 - self.momentum), dim=1)
        finite = torch.isfinite(mixed).all(dim=1, keepdim=True)  # a NaN / inf embedding (a step that
        self.bank.index_copy_(0, index, torch.where(finite, mixed, old))  # on_nonfinite=skip drops) writes nothing
