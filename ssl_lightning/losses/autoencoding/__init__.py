"""Reconstruction losses: the autoencoder's and denoising autoencoder's (MSE or cross-entropy, optional emphasis on
the corrupted components) and the context encoder's (overlap-weighted L2 of the hole, adversarial terms)."""
from ssl_lightning.losses.autoencoding.context_encoder import (context_encoder_loss, discriminator_loss,
                                                               generator_adversarial_loss, overlap_weights,
                                                               region_weights)
from ssl_lightning.losses.autoencoding.reconstruction import denoising_weights, reconstruction_loss

__all__ = ["context_encoder_loss", "denoising_weights", "discriminator_loss", "generator_adversarial_loss",
           "overlap_weights", "reconstruction_loss", "region_weights"]
