"""Pretraining methods; each registers itself in ``METHODS`` under its paper's name."""
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.byol import BYOL
from ssl_lightning.methods.moco import MoCoV1, MoCoV2
from ssl_lightning.methods.mocov3 import MoCoV3
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.simclr import SimCLR

__all__ = ["BYOL", "METHODS", "MoCoV1", "MoCoV2", "MoCoV3", "SSLMethod", "SimCLR"]
