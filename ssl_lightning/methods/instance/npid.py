"""NPID, instance discrimination with a non-parametric softmax over a memory bank (Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018; zhirongw/lemniscate.pytorch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning import distributed
from ssl_lightning.heads import mlp
from ssl_lightning.losses.instance.npid import npid_nce_loss, npid_nce_probs, npid_softmax_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.instance.per_sample import PerSampleState
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules.indexed_bank import IndexedBank
from ssl_lightning.modules.nce_normaliser import FrozenNormaliser
from ssl_lightning.registry import SSLError


class UniformNoise(nn.Module):
    """K noise indices per image, uniform over the n images (the positive may be drawn too, as in the official
    code). Draw t uses a generator seeded by ``(seed, t)`` and the draw counter is a buffer (saved in checkpoints),
    so a resumed run draws the same noise. The global batch's noise is drawn on every process and each takes its
    own rows: the draws equal one process's on the global batch."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        super().__init__()
        self.num_samples, self.seed = num_samples, seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self._draws: int | None = None  # host mirror of ``draws`` (None: read it from the buffer)

    @torch.no_grad()
    def sample(self, per_process: int, k: int, device: torch.device) -> torch.Tensor:
        if self._draws is None:
            self._draws = int(self.draws)
        world, rank = distributed.world_size(), distributed.rank()
        g = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self._draws)
        noise = torch.randint(self.num_samples, (world * per_process, k), generator=g, device=device)
        self._draws += 1
        self.draws.fill_(self._draws)
        return noise[rank * per_process:(rank + 1) * per_process]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._draws = None


@METHODS.register("npid")
class NPID(PerSampleState, SSLMethod):
    """Each image is a class whose weight is its memory-bank row: ``v = normalise(W f(x))``,
    ``P(i|v) = exp(m_i.v / T) / Z``; then the batch's rows ``m_i <- 0.5 m_i + 0.5 v_i``, renormalised.

    * ``nce_k > 0``: NCE with K uniform noise rows per image and Z frozen at ``n * mean(exp(m.v / T))`` of the
      first batch (the ImageNet recipe, K 4096, T 0.07).
    * ``nce_k = 0``: the exact softmax over all n rows, cross-entropy with logits ``m.v / T`` (the official CIFAR
      recipe, T 0.1).
    One view per image (``data.views`` with ``count: 1``); the batch's ``index`` addresses the bank. Under DDP the
    bank update gathers every process's rows (rank order), Z is the global batch's and the noise is drawn for the
    global batch, so every process holds the bank of one process on the global batch. The bank (and Z) take
    ``n x embed_dim`` floats on every process; DDP also broadcasts buffers from rank 0 each step.

    Args:
        embed_dim: the embedding's width (128): a linear layer on the backbone features, L2-normalised.
        nce_k: noise samples K (4096); 0 = exact softmax.
        temperature: T (0.07 with NCE on ImageNet; 0.1 for the CIFAR exact softmax).
        bank_momentum: the bank's momentum (0.5).
        num_samples: n, bank rows = pretraining images; None = read from the datamodule in ``setup`` (see
            :mod:`ssl_lightning.methods.instance.per_sample`).
        state_seed: seeds the bank's initialisation and the noise draws.
    """

    state_name = "memory bank"

    def __init__(self, embed_dim: int = 128, nce_k: int = 4096, temperature: float = 0.07, bank_momentum: float = 0.5,
                 num_samples: int | None = None, state_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if nce_k < 0:
            raise SSLError(f"NPID's nce_k={nce_k} must be >= 0: the number of noise samples (4096), or 0 for the exact "
                           "softmax over the whole memory bank")
        self.head = mlp([self.backbone.num_features, embed_dim])
        self.memory: IndexedBank | None = None
        self.normaliser: FrozenNormaliser | None = None
        self.noise: UniformNoise | None = None
        if num_samples is not None:
            self.build_state(num_samples)

    def _build_state(self, n: int) -> None:
        hp = self.hparams
        if hp.nce_k >= n:
            raise SSLError(f"NPID's nce_k={hp.nce_k} noise samples is not below the {n} training images: lower "
                           "model.init_args.nce_k (or 0 for the exact softmax)")
        device = self.head[0].weight.device
        self.memory = IndexedBank(n, hp.embed_dim, hp.bank_momentum, seed=hp.state_seed).to(device)
        if hp.nce_k > 0:
            self.normaliser = FrozenNormaliser(n).to(device)
            self.noise = UniformNoise(n, seed=hp.state_seed).to(device)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """v = normalise(W f): the 128-d embedding that the bank stores."""
        return F.normalize(self.head(feats), dim=1)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        self.require_state()
        v = self.embed(feats[0]).float()
        index = index.to(v.device)
        hp = self.hparams
        with torch.autocast(v.device.type, enabled=False):  # m.v / T in float32: bf16 would round the logits
            if hp.nce_k == 0:
                loss = npid_softmax_loss(v, self.memory.bank.clone(), index, hp.temperature)  # clone: updated below
            else:
                idx = torch.cat([index[:, None], self.noise.sample(index.shape[0], hp.nce_k, v.device)], dim=1)
                scores = npid_nce_probs(v, self.memory.rows(idx), hp.temperature, 1.0)  # exp(m.v / T)
                loss = npid_nce_loss(scores / self.normaliser(scores), self.memory.num_samples)
        self.memory.update(index, v)  # after the loss; every process's rows, rank order
        return loss
