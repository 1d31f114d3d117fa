"""Losses of semi-supervised methods that are more than one shared piece (``ssl_lightning.semi``)."""
from ssl_lightning.losses.semi_supervised.fixmatch import fixmatch_loss
from ssl_lightning.losses.semi_supervised.mixmatch import guess_labels, mixmatch_loss
from ssl_lightning.losses.semi_supervised.vat import adversarial_direction, normalise_per_sample, vat_loss

__all__ = ["adversarial_direction", "fixmatch_loss", "guess_labels", "mixmatch_loss", "normalise_per_sample", "vat_loss"]
