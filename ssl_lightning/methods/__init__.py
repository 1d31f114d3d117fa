"""Pretraining methods; each registers itself in ``METHODS`` under its paper's name."""
from ssl_lightning.methods.barlow_twins import BarlowTwins
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.byol import BYOL
from ssl_lightning.methods.dino import DINO
from ssl_lightning.methods.moco import MoCoV1, MoCoV2
from ssl_lightning.methods.mocov3 import MoCoV3
from ssl_lightning.methods.muconpro import DiscPro, GenPro, MuConPro
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.simclr import SimCLR
from ssl_lightning.methods.simsiam import SimSiam
from ssl_lightning.methods.swav import SwAV
from ssl_lightning.methods.twist import TWIST
from ssl_lightning.methods.vicreg import VICReg
from ssl_lightning.methods.wmse import WMSE

__all__ = ["BYOL", "BarlowTwins", "DINO", "DiscPro", "GenPro", "METHODS", "MoCoV1", "MoCoV2", "MoCoV3", "MuConPro", "SSLMethod", "SimCLR", "SimSiam", "SwAV", "TWIST", "VICReg", "WMSE"]
