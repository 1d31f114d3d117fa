"""Pretraining methods; each registers itself in ``METHODS`` under its paper's name."""
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.byol import BYOL
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.simclr import SimCLR

__all__ = ["BYOL", "METHODS", "SSLMethod", "SimCLR"]
