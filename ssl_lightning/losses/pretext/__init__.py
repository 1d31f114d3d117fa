"""Pretext-task losses: colorization's rebalanced multinomial cross-entropy (Zhang et al. 2016)."""
from ssl_lightning.losses.pretext.colorization import colorization_loss

__all__ = ["colorization_loss"]
