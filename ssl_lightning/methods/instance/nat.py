"""Noise As Targets (Bojanowski & Joulin, "Unsupervised Learning by Predicting Noise", ICML 2017; no official code)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.heads import mlp
from ssl_lightning.losses.instance.nat import nat_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.instance.per_sample import PerSampleState
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.modules.noise_targets import NoiseTargets


@METHODS.register("nat")
class NoiseAsTargets(PerSampleState, SSLMethod):
    """Fixed targets c_1..c_n uniform on the unit sphere, one per image; each batch, the images' assignment is
    re-solved among their own current targets (Hungarian algorithm, maximal total cosine), then
    ``L = mean_i ||f_i - c_{assignment[i]}||^2`` with ``f = normalise(W g(x))``.

    The targets and the assignment are per-image state (:class:`~ssl_lightning.modules.NoiseTargets`, buffers saved
    in checkpoints). Under DDP every process gathers the global batch's features and indices and solves the same
    assignment problem, so all hold the assignment of one process on the global batch. Choices where the paper
    leaves them open (no official code): a linear head to ``target_dim`` on the backbone features (the paper
    projects AlexNet's features to the targets' dimension too), no Sobel front end, a re-assignment every batch.

    Args:
        target_dim: d of the targets and the normalised features (128).
        num_samples: n, targets = pretraining images; None = read from the datamodule in ``setup``.
        state_seed: seeds the targets.
    """

    state_name = "targets"

    def __init__(self, target_dim: int = 128, num_samples: int | None = None, state_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.head = mlp([self.backbone.num_features, target_dim])
        self.noise_targets: NoiseTargets | None = None
        if num_samples is not None:
            self.build_state(num_samples)

    def _build_state(self, n: int) -> None:
        self.noise_targets = NoiseTargets(n, self.hparams.target_dim, seed=self.hparams.state_seed)
        self.noise_targets.to(self.head[0].weight.device)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(feats), dim=1)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        self.require_state()
        f = self.embed(feats[0])
        index = index.to(f.device)
        self.noise_targets.reassign(index, f)  # the global batch's Hungarian assignment, on every process
        return nat_loss(f, self.noise_targets.current(index))
