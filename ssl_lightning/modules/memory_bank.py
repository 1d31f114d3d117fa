"""A queue / memory bank of feature rows, saved in checkpoints (MoCo, SwAV, NCE, MuConPro...)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning import distributed


class MemoryBank(nn.Module):
    """``size`` rows of width ``dim`` held in buffers, so they are saved and restored with the model.

    * :meth:`enqueue` is an exact FIFO ring buffer: keys from all processes are gathered (rank order)
      and written after the newest rows, wrapping around the end.
    * :meth:`update` writes rows addressed by sample index (a memory bank over the dataset), with
      indices and values gathered from all processes first.
    Rows start as random unit vectors (``init="random"``) or zeros.

    The write position and fill count live in buffers (saved in checkpoints) and are mirrored in Python
    ints (:attr:`num_filled`, :attr:`position`), so a training step never waits for the device to
    report them; the mirrors are refreshed from the buffers when a state dict is loaded.
    """

    def __init__(self, size: int, dim: int, init: str = "random") -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"MemoryBank needs a positive size and dim, got size={size}, dim={dim}")
        rows = F.normalize(torch.randn(size, dim), dim=1) if init == "random" else torch.zeros(size, dim)
        self.register_buffer("bank", rows)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.position, self.num_filled = 0, 0  # host mirrors of ptr and filled
        self.register_load_state_dict_post_hook(_refresh_host_mirrors)

    def _sync_host(self) -> None:
        self.position, self.num_filled = int(self.ptr), int(self.filled)

    @property
    def is_full(self) -> bool:
        return self.num_filled == self.size

    def filled_rows(self) -> torch.Tensor:
        """The rows written so far (all of them once the queue has wrapped)."""
        return self.bank[: self.num_filled]

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        keys = distributed.gather(keys.detach()) if gather else keys.detach()
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {self.size} rows; use a larger queue")
        ptr = self.position
        idx = (torch.arange(n, device=self.bank.device) + ptr) % self.size
        self.bank[idx] = keys.to(self.bank.dtype)
        self.position, self.num_filled = (ptr + n) % self.size, min(self.num_filled + n, self.size)
        self.ptr.fill_(self.position)
        self.filled.fill_(self.num_filled)

    @torch.no_grad()
    def update(self, index: torch.Tensor, values: torch.Tensor, gather: bool = True) -> None:
        if gather:
            index, values = distributed.gather(index), distributed.gather(values.detach())
        self.bank[index] = values.detach().to(self.bank.dtype)


def _refresh_host_mirrors(module: MemoryBank, incompatible_keys) -> None:  # a module-level function: picklable
    module._sync_host()
