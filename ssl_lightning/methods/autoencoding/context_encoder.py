"""Context encoder (Pathak, Krahenbuhl, Donahue, Darrell & Efros, "Context Encoders: Feature Learning by Inpainting",
CVPR 2016; pathak22/context-encoder ``train.lua``, ``train_random.lua``)."""
from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.decoders import DCGANDiscriminator
from ssl_lightning.losses.autoencoding import (context_encoder_loss, discriminator_loss, generator_adversarial_loss,
                                               overlap_weights, reconstruction_loss, region_weights)
from ssl_lightning.methods.autoencoding.common import ReconstructionMethod
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.optim import build_optimizer, param_groups
from ssl_lightning.pretext.masks import central_mask, fill_with_mean, random_region_mask
from ssl_lightning.registry import SSLError

MASKS = ("central", "random")


@METHODS.register("context_encoder")
class ContextEncoder(ReconstructionMethod):
    """Inpainting: a region of the first view is filled with the dataset mean (0 in the normalised views), the
    encoder-decoder predicts it, ``L = (1 - lambda_adv) mean(w * (pred - x)^2 over the region) + lambda_adv BCE(D(pred), 1)``.

    ``mask="central"``: the centred ``hole`` square is predicted; its inner ``hole - 2 overlap`` square is masked, the
    ``overlap`` px border (visible context) counts ``overlap_weight`` times. ``mask="random"``: one random region per
    batch (20-30% of the image, ``random_region_mask``); the whole image is predicted, the unmasked pixels weighted
    ``overlap_weight``. The decoder predicts the whole image and the loss reads the region only (the paper's decoder
    outputs the hole alone).

    With ``lambda_adv > 0`` a DCGAN discriminator (on the predicted region vs. the true one) is trained by a second
    optimizer: Lightning manual optimisation, per batch D's update first, then the generator's with the updated D
    (``train.lua``'s order; D is stepped through the strategy, so ``global_step`` still counts batches). The generator's
    optimizer and schedule are the base class's; D gets the same optimizer kind at ``disc_lr_ratio`` times the
    generator's scaled learning rate (the paper: the generator at 10x, ``disc_lr_ratio=0.1``), constant. Both states
    are saved in checkpoints (Lightning's ``optimizer_states``).

    Args:
        mask: ``"central"`` or ``"random"``.
        hole: side of the predicted central square (default: half the image, the paper's 64 of 128).
        overlap: width of its border overlapping the context (the paper's code: 4 px of 128).
        overlap_weight: the L2 weight of the overlap border (central) or of the unmasked pixels (random), 10.
        lambda_adv: weight of the adversarial term (the paper: 0.001; 0 = L2 only, as the released features).
        disc_width: the discriminator's first-layer filters (ndf 64). disc_lr_ratio: D's learning rate / G's.
        **kwargs: :class:`~ssl_lightning.methods.autoencoding.common.ReconstructionMethod` options.
    """

    def __init__(self, mask: str = "central", hole: int | None = None, overlap: int = 4, overlap_weight: float = 10.0,
                 lambda_adv: float = 0.0, disc_width: int = 64, disc_lr_ratio: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        hp = self.hparams
        if mask not in MASKS:
            raise SSLError(f"ContextEncoder: unknown mask {mask!r}: choose one of {', '.join(MASKS)}")
        if not 0 <= lambda_adv < 1:
            raise SSLError(f"ContextEncoder: lambda_adv={lambda_adv} must be in [0, 1) (the paper: 0.001)")
        self.hole = hole or hp.image_size // 2
        if mask == "central":
            central_mask(hp.image_size, self.hole)  # a hole that fits the image, or a clear error
            overlap_weights(self.hole, overlap)  # an overlap that leaves a hole, or a clear error
        self.discriminator: nn.Module | None = None
        if lambda_adv > 0:
            side = self.hole if mask == "central" else hp.image_size
            self.discriminator = DCGANDiscriminator(hp.in_channels, side, disc_width)
            self.automatic_optimization = False

    # ---- inputs and the reconstruction term ---------------------------------------------------------------------
    def masked_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice | None]:
        """``(input, L2 weights over the predicted region, the region's rows / columns or None = whole image)``."""
        hp, size = self.hparams, x.shape[-1]
        if hp.mask == "central":
            fill = central_mask(size, self.hole - 2 * hp.overlap, x.device)
            start = (size - self.hole) // 2
            return (fill_with_mean(x, fill, torch.zeros(x.shape[1])),
                    overlap_weights(self.hole, hp.overlap, hp.overlap_weight, x.device), slice(start, start + self.hole))
        fill = random_region_mask(size, self.generator(), x.device)
        return fill_with_mean(x, fill, torch.zeros(x.shape[1])), region_weights(fill, hp.overlap_weight), None

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        x = views[0]
        self.check_images(x)
        inp, weight, region = self.masked_input(x)
        pred = self.decoder(self.encode(inp))
        if region is not None:
            pred, x = pred[..., region, region], x[..., region, region]
        rec = reconstruction_loss(pred, x, "mse", weight)
        if self.discriminator is None:
            return {"loss": rec, "rec": rec}
        disc = self.discriminator_step(x, pred.detach())
        adv = generator_adversarial_loss(self.discriminator(pred))
        return {"loss": context_encoder_loss(rec, adv, self.hparams.lambda_adv), "rec": rec, "adv": adv, "disc": disc}

    # ---- the adversarial term: a second optimizer -------------------------------------------------------------
    def separately_optimized(self) -> list[nn.Module]:
        return [self.discriminator] if self.discriminator is not None else []

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One update of D on ``BCE(D(real), 1) + BCE(D(fake), 0)``; returns that loss (detached)."""
        optimizer = self.optimizers()[1]
        loss = discriminator_loss(self.discriminator(real), self.discriminator(fake))
        optimizer.zero_grad()
        self.manual_backward(loss)
        # through the strategy (precision plugin, gradient hooks) but not LightningOptimizer.step, which would count
        # as a training step: global_step counts batches, as for every other method
        self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)
        return loss.detach()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        generator_opt = self.optimizers()[0]
        loss = super().training_step(batch, batch_idx)  # loss() updates D first
        generator_opt.zero_grad()
        self.manual_backward(loss)
        generator_opt.step()
        self.lr_schedulers().step()
        return loss.detach()

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.discriminator is None:
            return config
        hp = self.hparams
        lr = hp.lr * self.global_batch_size() / 256 * hp.disc_lr_ratio
        disc_opt = build_optimizer(hp.optimizer, param_groups(self.discriminator.parameters(), hp.weight_decay), lr,
                                   hp.momentum, tuple(hp.betas))
        return [config["optimizer"], disc_opt], [config["lr_scheduler"]]
