"""NPID's frozen NCE normalising constant Z (Wu et al. 2018; lemniscate.pytorch ``lib/NCEAverage.py``)."""
from __future__ import annotations

import torch
from torch import nn

from ssl_lightning import distributed


class FrozenNormaliser(nn.Module):
    """``Z = n * mean(exp(m.v / T))`` over the first batch's sampled entries, then frozen for the whole run.

    Held in a buffer (-1 = not computed yet), so it is saved in checkpoints and a resumed run keeps the first
    run's Z. Under DDP the mean is over the global batch (every process's entries), so Z is the one that one
    process on the global batch computes, and equal on every process.
    """

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.register_buffer("z", torch.tensor(-1.0))
        self._frozen = False  # host mirror of z >= 0: no device sync per step once known

    @property
    def is_frozen(self) -> bool:
        if not self._frozen:
            self._frozen = bool(self.z >= 0)
        return self._frozen

    @torch.no_grad()
    def forward(self, exp_scores: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Z (a 0-d tensor); computed from ``exp_scores`` (this process's ``exp(m.v/T)`` entries) on the first call."""
        if not self.is_frozen:
            stats = torch.stack([exp_scores.detach().double().sum(), torch.tensor(float(exp_scores.numel()),
                                                                                   dtype=torch.float64,
                                                                                   device=exp_scores.device)])
            stats = distributed.gather(stats[None]).sum(0) if gather else stats
            self.z.copy_(stats[0] / stats[1] * self.num_samples)  # on the device: no host read
            self._frozen = True
        return self.z

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen = False  # re-read from the loaded buffer
