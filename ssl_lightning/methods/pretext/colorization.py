"""Colorization (Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016; richzhang/colorization)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_lightning.backbones.feature_maps import feature_maps, pool, stage
from ssl_lightning.losses.pretext.colorization import colorization_loss
from ssl_lightning.methods.pretext.colour import (ColourMethod, DenseHead, estimate_prior, full_precision, hypercolumn_stages,
                                                 subsample)
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.pretext.color import (ANNEAL_T, COVERS, GRAY_THRESHOLD, LAMBDA, SIGMA, ab_gamut_bins, annealed_mean,
                                         lab_inputs, lab_to_rgb)
from ssl_lightning.registry import SSLError


@METHODS.register("colorization")
class Colorization(ColourMethod):
    """The encoder sees the lightness ``(L - 50) / 100`` only (built with one input channel) and a dense head
    predicts, at every position of a 1/``stride`` grid, a distribution over the Q in-gamut ab bins; the loss is
    the class-rebalanced multinomial cross-entropy against soft-encoded targets
    (:func:`~ssl_lightning.losses.pretext.colorization.colorization_loss`), chance ``ln Q``.

    Args:
        bins: ``"neighbours"`` (309 bins: the 4 grid points around every sRGB colour, the closest recomputed set
            to the official 313; default) or ``"nearest"`` (261: the bins sRGB colours round to); see
            :func:`~ssl_lightning.pretext.color.ab_gamut_bins`. The set is a buffer (checkpoints keep it), so
            ``set_bins`` can load the official ``pts_in_hull.npy``.
        stride: the prediction grid's stride (the paper's 1/4 resolution); the ab targets are sub-sampled to it.
        head_stages: the feature maps of the hypercolumn; None = the deepest stage of stride <= ``stride`` and the
            last stage, upsampled bilinearly to the grid (the paper's network keeps 1/4 resolution with dilated
            convolutions; a light head on a standard encoder here).
        hidden: the head's hidden width (1x1 convolutions).
        neighbours, sigma: soft encoding over the ``neighbours`` nearest bins, Gaussian ``sigma`` (paper: 5, 5;
            the official training code uses 10 neighbours).
        lam: rebalancing mix (paper 0.5; 1 = no rebalancing).
        prior_images: how many (seeded, un-augmented) training images estimate the prior p at the start of the
            first fit; the counts are a buffer, so a resumed or loaded run keeps them.
        gray_threshold: images with ``|a|, |b| <=`` it everywhere give no loss.
        temperature: annealed-mean decoding temperature of :meth:`colorize` (paper 0.38).
        **kwargs: :class:`~ssl_lightning.methods.pretext.colour.ColourMethod` options.
    """

    input_space = "lightness"

    def __init__(self, bins: str = "neighbours", stride: int = 4, head_stages: list[str] | None = None,
                 hidden: int = 256, neighbours: int = 5, sigma: float = SIGMA, lam: float = LAMBDA,
                 prior_images: int = 5000, gray_threshold: float = GRAY_THRESHOLD, temperature: float = ANNEAL_T,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if bins not in COVERS:
            raise SSLError(f"Colorization: bins={bins!r}; use one of {', '.join(COVERS)} (or set_bins(tensor) after init)")
        self.register_buffer("bins", ab_gamut_bins(cover=bins))
        self.register_buffer("prior_counts", torch.zeros(self.bins.shape[0], dtype=torch.float64))
        self.head_stages = hypercolumn_stages(self.backbone, stride, head_stages)
        channels = sum(stage(self.backbone, n).channels for n in self.head_stages)
        self.head = DenseHead(channels, self.bins.shape[0], hidden)

    def set_bins(self, bins: torch.Tensor) -> None:
        """Another bin set (Q, 2), e.g. the official 313 (``numpy.load("pts_in_hull.npy")``): rebuilds the head's
        output layer and resets the prior."""
        self.bins = bins.to(self.bins)
        self.prior_counts = torch.zeros(bins.shape[0], dtype=torch.float64, device=self.bins.device)
        old = self.head.out
        self.head.out = torch.nn.Conv2d(old.in_channels, bins.shape[0], 1).to(old.weight)

    def set_prior(self, counts: torch.Tensor) -> None:
        self.prior_counts.copy_(counts)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.prior_counts.sum() == 0:  # not estimated yet (a resumed / loaded run has its counts)
            self.prior_counts.copy_(estimate_prior(self.trainer.datamodule, self.bins.cpu(), self.hparams.prior_images))

    def encode(self, rgb: torch.Tensor) -> dict[str, Any]:
        with full_precision(rgb):
            lightness, ab = lab_inputs(rgb)
        maps = feature_maps(self.backbone, lightness)
        return {"feats": pool(next(reversed(maps.values()))), "maps": maps, "ab": ab}

    def logits(self, encoded: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's logits (B, Q, h, w) on the 1/stride grid and the ab targets there (B, 2, h, w)."""
        ab = subsample(encoded["ab"], self.hparams.stride)
        return self.head([encoded["maps"][n] for n in self.head_stages], tuple(ab.shape[-2:])), ab

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        if self.prior_counts.sum() == 0:
            raise SSLError("Colorization: the ab prior is not estimated: it is at the start of fit (from the datamodule), "
                           "or call set_prior(counts) (e.g. bin_counts over training images)")
        logits, ab = self.logits(self.take_encoded())
        with full_precision(logits):
            loss = colorization_loss(logits.float(), ab, self.bins, self.prior_counts, hp.lam, hp.neighbours, hp.sigma,
                                     hp.gray_threshold)
        return {"loss": loss}

    @torch.no_grad()
    def colorize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised RGB images -> their colorization (RGB in [0, 1]): the input's L with the annealed-mean ab of
        the predicted distributions, upsampled bilinearly to full resolution."""
        rgb = self.rgb(x)
        logits, _ = self.logits(self.encode(rgb))
        ab = annealed_mean(logits.float().softmax(dim=1), self.bins, self.hparams.temperature)
        ab = F.interpolate(ab, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        lightness = lab_inputs(rgb)[0] * 100 + 50
        return lab_to_rgb(torch.cat([lightness, ab], dim=1))
