"""Autoencoder and denoising autoencoder (Vincent, Larochelle, Bengio & Manzagol, "Extracting and Composing Robust
Features with Denoising Autoencoders", ICML 2008)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.autoencoding import denoising_weights, reconstruction_loss
from ssl_lightning.losses.autoencoding.reconstruction import KINDS
from ssl_lightning.methods.autoencoding.common import ReconstructionMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.pretext.masks import masking_noise
from ssl_lightning.registry import SSLError


@METHODS.register("autoencoder")
class AutoEncoder(ReconstructionMethod):
    """``L = mean l(g(f(x)), x)`` on the first view: f the backbone, g the matching decoder.

    Args:
        loss: ``"mse"`` (default; the squared error ``||x - g(f(x))||^2`` as a mean over pixels) or ``"bce"``: the
            cross-entropy of Vincent et al. 2008 for inputs in [0, 1], the decoder's outputs taken as logits and the
            views un-normalised to [0, 1] as targets.
        **kwargs: :class:`~ssl_lightning.methods.autoencoding.common.ReconstructionMethod` options.
    """

    def __init__(self, loss: str = "mse", **kwargs) -> None:
        super().__init__(**kwargs)
        if loss not in KINDS:
            raise SSLError(f"{type(self).__name__}: unknown loss {loss!r}: choose one of {', '.join(KINDS)}")

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalisation.to_raw(x) if self.hparams.loss == "bce" else x

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        x = views[0]
        self.check_images(x)
        # the pooled code of the clean view is the base class's feats[0]; other codes need their own pass
        code = feats[0] if self.hparams.bottleneck == "pooled" and self.hparams.stage is None else self.encode(x)
        pred = self.decoder(code)
        return {"loss": reconstruction_loss(pred, self.target(x), self.hparams.loss)}


@METHODS.register("denoising_autoencoder")
class DenoisingAutoEncoder(AutoEncoder):
    """Masking noise: a random ``noise`` fraction of each image's components (pixels x channels) forced to 0 (black:
    raw pixel 0, in the views' units), drawn anew every step; the clean image is reconstructed:
    ``L = mean w * l(g(f(x~)), x)``, ``w = alpha`` on the corrupted components and ``beta`` on the others.

    Args:
        noise: nu, the zeroed fraction (the paper: 0 to 50%, 25% its usual setting).
        alpha, beta: the emphasised criterion's weights (Vincent et al. 2010, sec. 4.3); 1, 1 = the plain criterion.
        **kwargs: :class:`AutoEncoder` options (``loss: bce`` = the paper's cross-entropy).
    """

    def __init__(self, noise: float = 0.25, alpha: float = 1.0, beta: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < noise < 1:
            raise SSLError(f"DenoisingAutoEncoder: noise={noise} must be in (0, 1), the fraction of inputs zeroed "
                           "(0 would be a plain autoencoder: method autoencoder)")
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise SSLError(f"DenoisingAutoEncoder: alpha={alpha}, beta={beta} must be >= 0, not both 0")

    def corrupt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x~, corrupted)``: x with masking noise (the shared builder decides which components), and the bool map."""
        corrupted = masking_noise(torch.ones_like(x), self.hparams.noise, self.generator()) == 0
        return torch.where(corrupted, self.normalisation.from_raw(0.0).to(x.dtype), x), corrupted

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        hp, x = self.hparams, views[0]
        self.check_images(x)
        noisy, corrupted = self.corrupt(x)
        pred = self.decoder(self.encode(noisy))
        weight = None if hp.alpha == hp.beta == 1 else denoising_weights(corrupted, hp.alpha, hp.beta)
        return {"loss": reconstruction_loss(pred, self.target(x), hp.loss, weight)}
